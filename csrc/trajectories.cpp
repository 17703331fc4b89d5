// Trajectory building on the CPU (specs/trajectory_attention.md, "Trajectories").
//
// trajectory_zbuffer: the occlusion test of trajectories_from_depth. Per frame, every point still
//   valid is splatted to its nearest pixel; the pixel keeps the smallest depth; a point deeper than
//   that by more than the relative tolerance is marked occluded. Frames are independent (parallel).
// trajectory_level_tables: for one UNet level, the flat latent pixel of every selected trajectory at
//   every frame, and the per-pixel CSR lists of the valid tokens landing on each (frame, pixel),
//   ascending in trajectory number (a counting sort: no comparison sort, O(F·N + F·H·W)).
// Both match the Python references in lightmotion_fast/camera/trajectories.py bit for bit: the same
// float32 operations in the same order.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

at::Tensor trajectory_zbuffer(const at::Tensor& uv, const at::Tensor& depth, const at::Tensor& valid,
                              int64_t height, int64_t width, double scale) {
  TORCH_CHECK(uv.dim() == 3 && uv.size(2) == 2 && uv.scalar_type() == at::kFloat,
              "trajectory_zbuffer: uv must be float32 [f, n, 2], got ", uv.sizes(), " ", uv.scalar_type());
  TORCH_CHECK(depth.dim() == 2 && depth.size(0) == uv.size(0) && depth.size(1) == uv.size(1) &&
                  depth.scalar_type() == at::kFloat,
              "trajectory_zbuffer: depth must be float32 [f, n] matching uv, got ", depth.sizes());
  TORCH_CHECK(valid.sizes() == depth.sizes() && valid.scalar_type() == at::kBool,
              "trajectory_zbuffer: valid must be bool [f, n] matching uv, got ", valid.sizes());
  TORCH_CHECK(height > 0 && width > 0, "trajectory_zbuffer: height and width must be positive");
  const auto uv_c = uv.contiguous();
  const auto z_c = depth.contiguous();
  const auto valid_c = valid.contiguous();
  auto out = valid_c.clone();
  const int64_t frames = uv.size(0), n = uv.size(1);
  const float* uvp = uv_c.const_data_ptr<float>();
  const float* zp = z_c.const_data_ptr<float>();
  bool* op = out.mutable_data_ptr<bool>();
  const float s = static_cast<float>(scale);

  at::parallel_for(0, frames, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(static_cast<size_t>(height * width));
    std::vector<int64_t> target(static_cast<size_t>(n));
    for (int64_t f = begin; f < end; ++f) {
      std::fill(zbuf.begin(), zbuf.end(), std::numeric_limits<float>::infinity());
      bool* ok = op + f * n;
      for (int64_t i = 0; i < n; ++i) {
        target[i] = -1;
        if (!ok[i]) continue;
        const int64_t x = static_cast<int64_t>(std::floor(uvp[(f * n + i) * 2] + 0.5f));
        const int64_t y = static_cast<int64_t>(std::floor(uvp[(f * n + i) * 2 + 1] + 0.5f));
        if (x < 0 || x >= width || y < 0 || y >= height) continue;
        target[i] = y * width + x;
        float& nearest = zbuf[target[i]];
        nearest = std::min(nearest, zp[f * n + i]);
      }
      for (int64_t i = 0; i < n; ++i) {
        if (target[i] >= 0 && zp[f * n + i] > zbuf[target[i]] * s) ok[i] = false;
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> trajectory_level_tables(
    const at::Tensor& coords, const at::Tensor& valid, const at::Tensor& selection, int64_t height0,
    int64_t width0, int64_t height, int64_t width) {
  TORCH_CHECK(coords.dim() == 3 && coords.size(2) == 2 && coords.scalar_type() == at::kFloat,
              "trajectory_level_tables: coords must be float32 [f, n, 2], got ", coords.sizes());
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == coords.size(0) && valid.size(1) == coords.size(1) &&
                  valid.scalar_type() == at::kBool,
              "trajectory_level_tables: valid must be bool [f, n] matching coords, got ", valid.sizes());
  TORCH_CHECK(selection.dim() == 1 && selection.scalar_type() == at::kLong,
              "trajectory_level_tables: selection must be int64 [n_s]");
  TORCH_CHECK(height0 > 0 && width0 > 0 && height > 0 && width > 0,
              "trajectory_level_tables: sizes must be positive");
  const auto c = coords.contiguous();
  const auto v = valid.contiguous();
  const auto sel = selection.contiguous();
  const int64_t frames = c.size(0), n_all = c.size(1), n = sel.size(0), hw = height * width;
  const float* cp = c.const_data_ptr<float>();
  const bool* vp = v.const_data_ptr<bool>();
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(sp[j] >= 0 && sp[j] < n_all, "trajectory_level_tables: selection value ", sp[j],
                " outside [0, ", n_all, ")");
  }
  TORCH_CHECK(frames * hw < std::numeric_limits<int32_t>::max() && frames * n < std::numeric_limits<int32_t>::max(),
              "trajectory_level_tables: tables too large for int32 indices");

  auto idx = at::empty({frames, n}, c.options().dtype(at::kInt));
  auto ok = at::empty({frames, n}, v.options());
  int32_t* ip = idx.mutable_data_ptr<int32_t>();
  bool* okp = ok.mutable_data_ptr<bool>();
  const float fw = static_cast<float>(width), fh = static_cast<float>(height);
  const float fw0 = static_cast<float>(width0), fh0 = static_cast<float>(height0);
  at::parallel_for(0, frames, 1, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t src = f * n_all + sp[j];
        int64_t x = static_cast<int64_t>(std::floor(cp[src * 2] * fw / fw0));
        int64_t y = static_cast<int64_t>(std::floor(cp[src * 2 + 1] * fh / fh0));
        x = std::min(std::max<int64_t>(x, 0), width - 1);
        y = std::min(std::max<int64_t>(y, 0), height - 1);
        ip[f * n + j] = static_cast<int32_t>(y * width + x);
        okp[f * n + j] = vp[src];
      }
    }
  });

  auto rowptr = at::zeros({frames * hw + 1}, c.options().dtype(at::kInt));
  int32_t* rp = rowptr.mutable_data_ptr<int32_t>();
  for (int64_t f = 0; f < frames; ++f)
    for (int64_t j = 0; j < n; ++j)
      if (okp[f * n + j]) ++rp[f * hw + ip[f * n + j] + 1];
  for (int64_t r = 0; r < frames * hw; ++r) rp[r + 1] += rp[r];
  auto col = at::empty({static_cast<int64_t>(rp[frames * hw])}, c.options().dtype(at::kInt));
  int32_t* colp = col.mutable_data_ptr<int32_t>();
  std::vector<int32_t> fill(rp, rp + frames * hw);
  for (int64_t f = 0; f < frames; ++f)
    for (int64_t j = 0; j < n; ++j)
      if (okp[f * n + j]) colp[fill[f * hw + ip[f * n + j]]++] = static_cast<int32_t>(j);
  return {idx, ok, rowptr, col};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightmotion_cpp, m) {
  // Occlusion test: uv [f, n, 2] float32 projected pixels, depth [f, n] float32 camera depth, valid
  // [f, n] bool; a valid point deeper than `scale` × the nearest depth at its pixel becomes invalid.
  m.def("trajectory_zbuffer(Tensor uv, Tensor depth, Tensor valid, int height, int width, float scale) -> Tensor");
  // One level's tables: idx [f, n_s] int32, valid [f, n_s] bool, rowptr [f·h·w + 1] int32, col [nnz] int32.
  m.def("trajectory_level_tables(Tensor coords, Tensor valid, Tensor selection, int height0, int width0, "
        "int height, int width) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightmotion_cpp, CPU, m) {
  m.impl("trajectory_zbuffer", &trajectory_zbuffer);
  m.impl("trajectory_level_tables", &trajectory_level_tables);
}
