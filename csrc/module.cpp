// lightmotion_fast._C: the Python module and the `lightmotion_cpp` op library.
// Ops are declared here with TORCH_LIBRARY and implemented per file with TORCH_LIBRARY_IMPL;
// later files may add declarations with TORCH_LIBRARY_FRAGMENT(lightmotion_cpp, m).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

TORCH_LIBRARY(lightmotion_cpp, m) {
  // CPU gather for the latent permutation; z/out are [b c f h w] views (any strides),
  // inv_affine [f, 2, 3] float32, exposed [f, h, w] bool.
  m.def("latent_permute_out(Tensor z, Tensor inv_affine, Tensor(a!) out, Tensor(b!) exposed) -> ()");
}

static std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightmotion_fast C++ extension: CPU index building and gathers (torch.ops.lightmotion_cpp)";
  m.def("torch_version", &torch_version, "torch version this extension was compiled against");
}
