// CPU builder of LightMotion's fill map (specs/lightmotion.md, "Latent space resampling").
// Semantics and the map format: lightmotion_fast/reference/latent_resample.py. This file gives the
// same map bit for bit: the same float32 source positions (round half up), the same alignment
// transforms (passed in, composed once in Python), and the same counter-based hash for the draws.
// Frames are sequential (alignment reads frame f-1); the rows of a frame run in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
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

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline void round_affine(const float* m, int64_t x, int64_t y, int64_t& oy, int64_t& ox) {
  const float xf = static_cast<float>(x), yf = static_cast<float>(y);
  // Two products and two sums, in the reference's order (contraction is off for this file, above).
  const float sx = m[0] * xf + m[1] * yf + m[2];
  const float sy = m[3] * xf + m[4] * yf + m[5];
  ox = static_cast<int64_t>(std::floor(sx + 0.5f));
  oy = static_cast<int64_t>(std::floor(sy + 0.5f));
}

// Which line an exposed pixel draws its fill from (reference/latent_resample.py, "The line").
enum FillAxis : int64_t { kStrip = 0, kRow = 1, kColumn = 2 };

int64_t overshoot(int64_t s, int64_t size) {
  return std::max<int64_t>({int64_t{0}, -s, s - (size - 1)});
}

bool fill_along_column(int64_t axis, int64_t sy, int64_t sx, int64_t height, int64_t width) {
  if (axis == kRow) return false;
  if (axis == kColumn) return true;
  return overshoot(sy, height) * width > overshoot(sx, width) * height;
}

at::Tensor build_fill_map(const at::Tensor& inv_affine, const at::Tensor& align_affine,
                          const at::Tensor& background, int64_t seed, int64_t axis) {
  TORCH_CHECK(axis == kStrip || axis == kRow || axis == kColumn,
              "build_fill_map: axis must be 0 (strip), 1 (row) or 2 (column), got ", axis);
  TORCH_CHECK(background.dim() == 3 && background.scalar_type() == at::kBool,
              "build_fill_map: background must be a bool [f, h, w] tensor, got ", background.sizes());
  const int64_t frames = background.size(0), height = background.size(1), width = background.size(2);
  TORCH_CHECK(inv_affine.scalar_type() == at::kFloat && inv_affine.numel() == frames * 6,
              "build_fill_map: inv_affine must be float32 [f, 2, 3] with f = ", frames);
  TORCH_CHECK(align_affine.scalar_type() == at::kFloat && align_affine.numel() == frames * 6,
              "build_fill_map: align_affine must be float32 [f, 2, 3] with f = ", frames);
  const auto inv_c = inv_affine.contiguous();
  const auto align_c = align_affine.contiguous();
  const auto bg_c = background.contiguous();
  const float* inv = inv_c.const_data_ptr<float>();
  const float* align = align_c.const_data_ptr<float>();
  const bool* bg = bg_c.const_data_ptr<bool>();
  const int64_t hw = height * width;

  auto fill = at::empty({frames, height, width}, at::TensorOptions().dtype(at::kInt));
  int32_t* out = fill.mutable_data_ptr<int32_t>();
  std::vector<uint8_t> exposed(static_cast<size_t>(frames * hw));
  const uint64_t key = mix64(static_cast<uint64_t>(seed));

  // Candidate lists per frame: background positions of every row, of every column, and of the frame.
  std::vector<int32_t> frame_bg;
  std::vector<std::vector<int32_t>> rows(height), columns(width);
  frame_bg.reserve(hw);

  for (int64_t f = 0; f < frames; ++f) {
    const bool* bgf = bg + f * hw;
    frame_bg.clear();
    for (auto& line : rows) line.clear();
    for (auto& line : columns) line.clear();
    for (int64_t y = 0; y < height; ++y) {
      for (int64_t x = 0; x < width; ++x) {
        if (!bgf[y * width + x]) continue;
        frame_bg.push_back(static_cast<int32_t>(y * width + x));
        rows[y].push_back(static_cast<int32_t>(x));
        columns[x].push_back(static_cast<int32_t>(y));
      }
    }
    const float* a = inv + f * 6;
    const float* m = align + f * 6;
    int32_t* outf = out + f * hw;
    const int32_t* prevf = out + (f - 1) * hw;
    uint8_t* expf = exposed.data() + f * hw;
    const uint8_t* exp_prev = exposed.data() + (f - 1) * hw;
    const int64_t base = f * hw;

    at::parallel_for(0, height, 4, [&](int64_t begin, int64_t end) {
      for (int64_t y = begin; y < end; ++y) {
        for (int64_t x = 0; x < width; ++x) {
          int64_t sy, sx;
          round_affine(a, x, y, sy, sx);
          const int64_t p = y * width + x;
          if (sx >= 0 && sx < width && sy >= 0 && sy < height) {
            expf[p] = 0;
            outf[p] = static_cast<int32_t>(base + sy * width + sx);
            continue;
          }
          expf[p] = 1;
          if (f > 0) {
            int64_t qy, qx;
            round_affine(m, x, y, qy, qx);
            if (qx >= 0 && qx < width && qy >= 0 && qy < height && exp_prev[qy * width + qx]) {
              outf[p] = prevf[qy * width + qx];
              continue;
            }
          }
          const uint64_t h = mix64(key + (static_cast<uint64_t>(base + p) + 1ULL) * kGolden);
          const bool by_column = fill_along_column(axis, sy, sx, height, width);
          const auto& line = by_column ? columns[x] : rows[y];
          int64_t py, px;
          if (!line.empty()) {
            const int64_t pick = line[h % line.size()];
            py = by_column ? pick : y;
            px = by_column ? x : pick;
          } else if (!frame_bg.empty()) {
            const int64_t pick = frame_bg[h % frame_bg.size()];
            py = pick / width;
            px = pick % width;
          } else {
            const int64_t pick = static_cast<int64_t>(h % static_cast<uint64_t>(hw));
            py = pick / width;
            px = pick % width;
          }
          outf[p] = static_cast<int32_t>(base + py * width + px);
        }
      }
    });
  }
  return fill;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightmotion_cpp, m) {
  // Fill map for latent_resample: int32 [f, h, w], entry (src_frame * h + y) * w + x of the original
  // latent. inv_affine / align_affine float32 [f, 2, 3]; background bool [f, h, w] (True: background);
  // axis 0: per exposed strip, 1: rows, 2: columns (reference/latent_resample.py, "The line").
  m.def("build_fill_map(Tensor inv_affine, Tensor align_affine, Tensor background, int seed, int axis) -> Tensor");
}

TORCH_LIBRARY_IMPL(lightmotion_cpp, CPU, m) {
  m.impl("build_fill_map", &build_fill_map);
}
