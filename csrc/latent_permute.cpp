// CPU implementation of the latent permutation gather (specs/lightmotion.md).
// The source position of each output pixel is computed with the same float32 operations as the
// reference and the Triton kernel (round half up), once per (frame, pixel), then reused for every
// batch and channel plane.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <vector>

// Every product is rounded before the sums, as in the reference and the Triton kernel (launched with
// enable_fp_fusion=False): no FMA contraction, whatever -march the extension is built with, so all
// implementations pick the same source pixel.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

template <typename scalar_t>
void permute_frames(const at::Tensor& z, const float* inv, at::Tensor& out, bool* exposed) {
  const int64_t batch = z.size(0), channels = z.size(1), frames = z.size(2);
  const int64_t height = z.size(3), width = z.size(4);
  const auto zs = z.strides();
  const auto os = out.strides();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();

  // One task per output row (frame, y): its source offsets are computed once, then every
  // (batch, channel) plane copies that row, so writes stay contiguous along x.
  at::parallel_for(0, frames * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> src(width);
    std::vector<uint8_t> kept(width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t f = row / height, y = row % height;
      const float* a = inv + f * 6;
      const float yf = static_cast<float>(y);
      for (int64_t x = 0; x < width; ++x) {
        const float xf = static_cast<float>(x);
        const float sx = a[0] * xf + a[1] * yf + a[2];
        const float sy = a[3] * xf + a[4] * yf + a[5];
        const int64_t ix = static_cast<int64_t>(std::floor(sx + 0.5f));
        const int64_t iy = static_cast<int64_t>(std::floor(sy + 0.5f));
        const bool k = ix >= 0 && ix < width && iy >= 0 && iy < height;
        kept[x] = k;
        src[x] = k ? iy * zs[3] + ix * zs[4] : 0;
        exposed[(f * height + y) * width + x] = !k;
      }
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* zrow = zp + b * zs[0] + c * zs[1] + f * zs[2];
          scalar_t* orow = op + b * os[0] + c * os[1] + f * os[2] + y * os[3];
          for (int64_t x = 0; x < width; ++x) {
            orow[x * os[4]] = kept[x] ? zrow[src[x]] : scalar_t(0);
          }
        }
      }
    }
  });
}

void latent_permute_out(const at::Tensor& z, const at::Tensor& inv_affine, at::Tensor out, at::Tensor exposed) {
  TORCH_CHECK(z.dim() == 5, "latent_permute: z must be [b c f h w], got ", z.sizes());
  TORCH_CHECK(out.sizes() == z.sizes(), "latent_permute: out must match z, got ", out.sizes());
  TORCH_CHECK(inv_affine.scalar_type() == at::kFloat && inv_affine.is_contiguous() &&
                  inv_affine.numel() == z.size(2) * 6,
              "latent_permute: inv_affine must be a contiguous float32 [f, 2, 3] tensor");
  TORCH_CHECK(exposed.scalar_type() == at::kBool && exposed.is_contiguous() &&
                  exposed.numel() == z.size(2) * z.size(3) * z.size(4),
              "latent_permute: exposed must be a contiguous bool [f, h, w] tensor");
  const float* inv = inv_affine.const_data_ptr<float>();
  bool* exp = exposed.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "latent_permute_out", [&] {
    permute_frames<scalar_t>(z, inv, out, exp);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lightmotion_cpp, CPU, m) {
  m.impl("latent_permute_out", &latent_permute_out);
}
