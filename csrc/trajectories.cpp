// Trajectory building on the CPU (specs/trajectory_attention.md, "Trajectories").
//
// trajectory_zbuffer: the occlusion test of trajectories_from_depth. Per frame, the quads between
//   neighbouring source pixels are rasterised (fixed-point edge functions: exact, so the Python reference
//   agrees bit for bit) and every valid point is splatted to its nearest pixel; each pixel keeps the
//   smallest depth; a point deeper than that by more than the relative tolerance is marked occluded.
//   Quads fill the holes a magnified surface leaves between its points, so what lies behind it is hidden
//   (as the official depth path's splat between diagonal neighbours does). Frames are independent (parallel).
// trajectory_level_tables: for one UNet level, the flat latent pixel of every selected trajectory at
//   every frame, and the per-pixel CSR lists of the valid tokens landing on each (frame, pixel),
//   ascending in trajectory number (a counting sort: no comparison sort, O(F·N + F·H·W)).
// Both match the Python references in lightmotion_fast/camera/trajectories.py bit for bit: the same
// float32 operations in the same order.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Fixed-point vertex coordinate: 1/256 pixel, rounded half up (computed in double: exact for |x| <= 2^20).
constexpr double kSub = 256.0;
constexpr float kMaxCoord = 1048576.0f;  // quads with a corner farther out than 2^20 px are not splatted

inline int64_t to_fixed(float x) { return static_cast<int64_t>(std::floor(static_cast<double>(x) * kSub + 0.5)); }

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Twice the signed area of (v0, v1, p): which side of the edge v0 -> v1 the point p lies on. Exact in int64
// (fixed-point coordinates are below 2^29 in magnitude).
inline int64_t edge_fn(int64_t x0, int64_t y0, int64_t x1, int64_t y1, int64_t px, int64_t py) {
  return (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0);
}

// Pixel centre (px, py) (fixed point) inside the triangle v0 v1 v2 or on its boundary; zero-area triangles
// cover nothing.
inline bool in_triangle(const int64_t* vx, const int64_t* vy, int i0, int i1, int i2, int64_t px, int64_t py) {
  if (edge_fn(vx[i0], vy[i0], vx[i1], vy[i1], vx[i2], vy[i2]) == 0) return false;
  const int64_t e0 = edge_fn(vx[i0], vy[i0], vx[i1], vy[i1], px, py);
  const int64_t e1 = edge_fn(vx[i1], vy[i1], vx[i2], vy[i2], px, py);
  const int64_t e2 = edge_fn(vx[i2], vy[i2], vx[i0], vy[i0], px, py);
  return (e0 >= 0 && e1 >= 0 && e2 >= 0) || (e0 <= 0 && e1 <= 0 && e2 <= 0);
}

// Rasterise every quad of the source grid (pixel (i, j) with its right, bottom and diagonal neighbours, as
// the triangles a b c and a c d) into zbuf with the quad's largest corner depth. A quad is splatted when its
// four corners are valid, within kMaxCoord, and no corner is deeper than `edge_scale` x the nearest
// (a larger jump is a depth edge: the gap between the two surfaces is disoccluded, not covered).
void splat_quads(std::vector<float>& zbuf, const float* uvp, const float* zp, const bool* ok, int64_t grid_h,
                 int64_t grid_w, int64_t height, int64_t width, float edge_scale) {
  for (int64_t i = 0; i + 1 < grid_h; ++i) {
    for (int64_t j = 0; j + 1 < grid_w; ++j) {
      const int64_t corner[4] = {i * grid_w + j, i * grid_w + j + 1, (i + 1) * grid_w + j + 1, (i + 1) * grid_w + j};
      bool use = true;
      float zmin = std::numeric_limits<float>::infinity(), zmax = -std::numeric_limits<float>::infinity();
      int64_t vx[4], vy[4];
      for (int c = 0; c < 4; ++c) {
        const int64_t p = corner[c];
        const float x = uvp[p * 2], y = uvp[p * 2 + 1];
        use = ok[p] && std::abs(x) <= kMaxCoord && std::abs(y) <= kMaxCoord;  // NaN fails too
        if (!use) break;
        zmin = std::min(zmin, zp[p]);
        zmax = std::max(zmax, zp[p]);
        vx[c] = to_fixed(x);
        vy[c] = to_fixed(y);
      }
      if (!use || !(zmax <= zmin * edge_scale)) continue;
      const int64_t sub = static_cast<int64_t>(kSub);
      const int64_t x_lo = std::max<int64_t>(-floor_div(-*std::min_element(vx, vx + 4), sub), 0);
      const int64_t x_hi = std::min<int64_t>(floor_div(*std::max_element(vx, vx + 4), sub), width - 1);
      const int64_t y_lo = std::max<int64_t>(-floor_div(-*std::min_element(vy, vy + 4), sub), 0);
      const int64_t y_hi = std::min<int64_t>(floor_div(*std::max_element(vy, vy + 4), sub), height - 1);
      for (int64_t py = y_lo; py <= y_hi; ++py) {
        for (int64_t px = x_lo; px <= x_hi; ++px) {
          if (in_triangle(vx, vy, 0, 1, 2, px * sub, py * sub) || in_triangle(vx, vy, 0, 2, 3, px * sub, py * sub)) {
            float& nearest = zbuf[py * width + px];
            nearest = std::min(nearest, zmax);
          }
        }
      }
    }
  }
}

at::Tensor trajectory_zbuffer(const at::Tensor& uv, const at::Tensor& depth, const at::Tensor& valid,
                              int64_t height, int64_t width, double scale, int64_t grid_height, int64_t grid_width,
                              double edge) {
  TORCH_CHECK(uv.dim() == 3 && uv.size(2) == 2 && uv.scalar_type() == at::kFloat,
              "trajectory_zbuffer: uv must be float32 [f, n, 2], got ", uv.sizes(), " ", uv.scalar_type());
  TORCH_CHECK(depth.dim() == 2 && depth.size(0) == uv.size(0) && depth.size(1) == uv.size(1) &&
                  depth.scalar_type() == at::kFloat,
              "trajectory_zbuffer: depth must be float32 [f, n] matching uv, got ", depth.sizes());
  TORCH_CHECK(valid.sizes() == depth.sizes() && valid.scalar_type() == at::kBool,
              "trajectory_zbuffer: valid must be bool [f, n] matching uv, got ", valid.sizes());
  TORCH_CHECK(height > 0 && width > 0, "trajectory_zbuffer: height and width must be positive");
  TORCH_CHECK((grid_height == 0 && grid_width == 0) || (grid_height > 0 && grid_width > 0 &&
                                                         grid_height * grid_width == uv.size(1)),
              "trajectory_zbuffer: grid_height x grid_width must be 0 x 0 (points only) or the n = ", uv.size(1),
              " source pixels, got ", grid_height, " x ", grid_width);
  const auto uv_c = uv.contiguous();
  const auto z_c = depth.contiguous();
  const auto valid_c = valid.contiguous();
  auto out = valid_c.clone();
  const int64_t frames = uv.size(0), n = uv.size(1);
  const float* uvp = uv_c.const_data_ptr<float>();
  const float* zp = z_c.const_data_ptr<float>();
  const bool* vp = valid_c.const_data_ptr<bool>();
  bool* op = out.mutable_data_ptr<bool>();
  const float s = static_cast<float>(scale);
  const float edge_scale = static_cast<float>(1.0 + edge);

  at::parallel_for(0, frames, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(static_cast<size_t>(height * width));
    std::vector<int64_t> target(static_cast<size_t>(n));
    for (int64_t f = begin; f < end; ++f) {
      std::fill(zbuf.begin(), zbuf.end(), std::numeric_limits<float>::infinity());
      if (grid_height > 0)
        splat_quads(zbuf, uvp + f * n * 2, zp + f * n, vp + f * n, grid_height, grid_width, height, width, edge_scale);
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
  // grid_height x grid_width > 0: the n points are that source grid (row-major), and each grid quad is also
  // rasterised (its largest corner depth), unless its corner depths differ by more than 1 + edge.
  m.def("trajectory_zbuffer(Tensor uv, Tensor depth, Tensor valid, int height, int width, float scale, "
        "int grid_height=0, int grid_width=0, float edge=0.1) -> Tensor");
  // One level's tables: idx [f, n_s] int32, valid [f, n_s] bool, rowptr [f·h·w + 1] int32, col [nnz] int32.
  m.def("trajectory_level_tables(Tensor coords, Tensor valid, Tensor selection, int height0, int width0, "
        "int height, int width) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightmotion_cpp, CPU, m) {
  m.impl("trajectory_zbuffer", &trajectory_zbuffer);
  m.impl("trajectory_level_tables", &trajectory_level_tables);
}
