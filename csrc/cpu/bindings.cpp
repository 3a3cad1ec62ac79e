// The extension's ops: schemas (TORCH_LIBRARY), their CPU kernels, and no-op Meta kernels (the outputs are
// arguments the caller allocated, mutated in place: nothing to infer), so fake tensors and opcheck pass.
// fastkd/backends/cpu.py calls them; under torch.compile the generic fastkd::* ops of fastkd/_ops.py,
// which name the backend, wrap them.
#include <torch/library.h>

#include "ops.h"

namespace fastkd {
namespace cpu {

// The instruction set this build's vector code targets, and the threads at::parallel_for uses.
std::string info() {
  return std::string(FASTKD_ISA) + " vector width " + std::to_string(Vec<float>::size()) + " floats, " +
         std::to_string(at::get_num_threads()) + " threads";
}

}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY(fastkd_cpu, m) {
  m.def("info() -> str");
  m.def("softmax_fwd(Tensor x, Tensor? t, float t_value, bool log, Tensor(a!) y, Tensor(b!) stats) -> ()");
  m.def("softmax_bwd(Tensor grad, Tensor saved, Tensor? t, float t_value, Tensor stats, bool log, Tensor(a!) dx, "
        "Tensor(b!) dt, bool need_dx, bool need_dt) -> ()");
  m.def("kd_loss_fwd(Tensor student, Tensor teacher, Tensor? target, Tensor? t, float t_value, Tensor? tt, "
        "float tt_value, Tensor? scale_tensor, float scale, bool scale_grad, float alpha, float beta, float skew, "
        "float ab_alpha, float ab_beta, float dkd_alpha, float dkd_beta, float softcap, float label_smoothing, float norm_scale, int ignore_index, int divergence, int norm, "
        "bool temperature_squared, bool return_parts, Tensor(a!) rows, Tensor(b!) grad, Tensor(c!) parts) -> ()");
  m.def("kd_loss_topk_fwd(Tensor student, Tensor indices, Tensor values, Tensor? target, Tensor? t, float t_value, "
        "Tensor? tt, float tt_value, Tensor? scale_tensor, float scale, bool scale_grad, float alpha, float beta, "
        "float skew, float ab_alpha, float ab_beta, float softcap, float label_smoothing, int ignore_index, "
        "int divergence, bool bucket, bool temperature_squared, bool return_parts, Tensor(a!) rows, Tensor(b!) grad, Tensor(c!) parts) -> ()");
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  m.def("calibration(Tensor logits, Tensor target, int mode, Tensor? t, float t_value, bool probs, bool log_input, "
        "int ignore_index, int n_bins, Tensor(a!) sums, Tensor(b!) bin_count, Tensor(c!) bin_correct, "
        "Tensor(d!) bin_conf, Tensor(e!) confidence, Tensor(f!) correct) -> ()");
  m.def("fidelity(Tensor student, Tensor teacher, Tensor? t, float t_value, Tensor(a!) agree, Tensor(b!) kl) -> ()");
  m.impl("info", &fastkd::cpu::info);
}

TORCH_LIBRARY_IMPL(fastkd_cpu, CPU, m) {
  m.impl("softmax_fwd", &fastkd::cpu::softmax_fwd);
  m.impl("softmax_bwd", &fastkd::cpu::softmax_bwd);
  m.impl("kd_loss_fwd", &fastkd::cpu::kd_loss_fwd);
  m.impl("kd_loss_topk_fwd", &fastkd::cpu::kd_loss_topk_fwd);
  m.impl("scale_grad_", &fastkd::cpu::scale_grad_);
  m.impl("calibration", &fastkd::cpu::calibration);
  m.impl("fidelity", &fastkd::cpu::fidelity);
}

TORCH_LIBRARY_IMPL(fastkd_cpu, Meta, m) {
  m.impl("softmax_fwd", [](const at::Tensor&, const c10::optional<at::Tensor>&, double, bool, at::Tensor, at::Tensor) {});
  m.impl("softmax_bwd", [](const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, const at::Tensor&,
                           bool, at::Tensor, at::Tensor, bool, bool) {});
  m.impl("kd_loss_fwd", [](const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, double, const c10::optional<at::Tensor>&, double,
                           const c10::optional<at::Tensor>&, double, bool, double, double, double, double, double,
                           double, double, double, double, double, int64_t, int64_t, int64_t, bool, bool, at::Tensor, at::Tensor,
                           at::Tensor) {});
  m.impl("kd_loss_topk_fwd", [](const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                const c10::optional<at::Tensor>&, double, const c10::optional<at::Tensor>&, double,
                                const c10::optional<at::Tensor>&, double, bool, double, double, double, double, double,
                                double, double, int64_t, int64_t, bool, bool, bool, at::Tensor, at::Tensor,
                                at::Tensor) {});
  m.impl("scale_grad_", [](at::Tensor, const at::Tensor&) {});
  m.impl("calibration", [](const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&, double, bool, bool,
                           int64_t, int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor) {});
  m.impl("fidelity", [](const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, at::Tensor,
                        at::Tensor) {});
}

#ifdef FASTKD_PYTHON_MODULE
// The ahead-of-time build is a Python extension module (fastkd._C_cpu_<isa>): importing it loads the library,
// whose static initializers above register the ops.
#include <Python.h>
#define FASTKD_CAT2(a, b) a##b
#define FASTKD_CAT(a, b) FASTKD_CAT2(a, b)
static struct PyModuleDef fastkd_module = {PyModuleDef_HEAD_INIT, FASTKD_STR(FASTKD_PYTHON_MODULE), nullptr, -1, nullptr};
PyMODINIT_FUNC FASTKD_CAT(PyInit_, FASTKD_PYTHON_MODULE)(void) { return PyModule_Create(&fastkd_module); }
#endif
