// The Python module of the compiled kernels: every entry point, declared here and defined in its
// own file, bound with pybind11. The one C++ file that includes torch's Python headers (about 15 s
// of a build to parse; torch/extension.h, which adds the whole C++ frontend, about 22 s); the
// kernels need only ATen's (about 6 s).
#include <torch/python.h>

#include <vector>

namespace hashgrid {

// hashgrid_cpu.cpp (CPU and, with WITH_CUDA, CUDA): the hash-grid encoding.
at::Tensor forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, int64_t, bool,
                   int64_t);
std::vector<at::Tensor> backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                 const at::Tensor&, int64_t, bool, int64_t, bool, bool);
std::vector<at::Tensor> double_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, int64_t,
                                        bool, int64_t, bool, bool, bool);
// Fused kernels of fused_cpu.cpp.
std::vector<at::Tensor> fields_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       int64_t, bool, int64_t, const at::Tensor&, const std::vector<at::Tensor>&,
                                       const std::vector<at::Tensor>&, double, bool);
std::vector<at::Tensor> fields_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, int64_t,
                                        const at::Tensor&, const std::vector<at::Tensor>&,
                                        const std::vector<at::Tensor>&, double);
at::Tensor fields_jacobian(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                           int64_t, const at::Tensor&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                           double);
std::vector<at::Tensor> gradient_icon(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, int64_t, bool, int64_t, const at::Tensor&,
                                      const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, double, bool,
                                      double, double, const std::vector<at::Tensor>&);
// similarity_cpu.cpp
std::vector<at::Tensor> similarity(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, bool, int64_t, const at::Tensor&,
                                   const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, double, bool,
                                   int64_t, double, int64_t);
std::vector<at::Tensor> affine_ncc(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, double, int64_t, int64_t);
// optim_cpu.cpp
void adam_step(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
               const std::vector<at::Tensor>&, const std::vector<int64_t>&, double, double, double, double, bool);

}  // namespace hashgrid

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &hashgrid::forward, "hash-grid encoding: forward");
  m.def("backward", &hashgrid::backward, "hash-grid encoding: dL/dx and dL/dtable");
  m.def("double_backward", &hashgrid::double_backward, "hash-grid encoding: derivatives of the backward");
  m.def("fields_forward", &hashgrid::fields_forward, "fused encoding + MLP displacement (CPU)");
  m.def("fields_backward", &hashgrid::fields_backward, "fused encoding + MLP: parameter gradients (CPU)");
  m.def("fields_jacobian", &hashgrid::fields_jacobian, "fused encoding + MLP: du/dx of each point's field (CPU)");
  m.def("gradient_icon", &hashgrid::gradient_icon, "fused gradient-ICON penalty and its gradient (CPU)");
  m.def("similarity", &hashgrid::similarity, "fused SSD, NCC or MI similarity of both maps and its gradient (CPU)");
  m.def("affine_ncc", &hashgrid::affine_ncc,
        "affine stage: correlation, SSD or MI of K affine maps and its gradient (CPU)");
  m.def("adam_step", &hashgrid::adam_step, "one Adam step of a list of tensors, one pass over each (CPU)");
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
