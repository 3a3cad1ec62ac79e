// The CUDA extension's ops (torch.ops.fastkd_cuda.*): the schemas (kd_loss_fwd's is fastkd_cpu's), their
// CUDA implementations, which check the tensors with named TORCH_CHECKs, fill launch.h's argument
// structs and launch on the current stream under a device guard, and no-op Meta kernels (the outputs
// are arguments the caller allocated, mutated in place), so fake tensors and opcheck pass.
// fastkd/backends/cuda.py calls them; what they do not cover runs on another backend there.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"

namespace fastkd {
namespace cuda {
namespace {

int dtype_of(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return F32;
    case at::kHalf:
      return F16;
    case at::kBFloat16:
      return BF16;
    default:
      TORCH_CHECK(false, "fastkd_cuda: ", name, " must be float16, bfloat16 or float32, got ", x.scalar_type());
  }
  return F32;
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "fastkd_cuda: ", name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, "fastkd_cuda: ", name, " must be 2-D (N, V), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fastkd_cuda: ", name, " must have a unit column stride");
}

void check_same_device(const at::Tensor& x, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(x.device() == ref.device(), "fastkd_cuda: ", name, " must be on ", ref.device(), ", got ", x.device());
}

// (pointer, stride) of a temperature: a float32 copy on the device when a tensor (0-d: stride 0).
const float* temperature(const c10::optional<at::Tensor>& t, const at::Tensor& ref, int64_t N, at::Tensor& keep,
                         int64_t* stride) {
  *stride = 0;
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->dim() == 0 || (t->dim() == 1 && t->size(0) == N),
              "fastkd_cuda: a temperature tensor must be 0-d or (N,), got ", t->sizes());
  keep = t->to(ref.device(), at::kFloat);  // a CPU 0-d temperature is copied over
  *stride = keep.dim() == 0 ? 0 : keep.stride(0);
  return keep.data_ptr<float>();
}

void check_target(const at::Tensor& target, const at::Tensor& ref, int64_t N) {
  check_same_device(target, ref, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N && target.is_contiguous() &&
                  (target.scalar_type() == at::kLong || target.scalar_type() == at::kInt),
              "fastkd_cuda: target must be a contiguous (N,) int64 or int32 tensor");
}

void kd_loss_fwd(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
                 const c10::optional<at::Tensor>& t, double t_value, const c10::optional<at::Tensor>& tt, double tt_value,
                 const c10::optional<at::Tensor>& scale_tensor, double scale, bool scale_grad, double alpha, double beta,
                 double skew, double ab_alpha, double ab_beta, double dkd_alpha, double dkd_beta, double softcap,
                 double label_smoothing, double norm_scale,
                 int64_t ignore_index, int64_t divergence, int64_t norm, bool temperature_squared, bool return_parts,
                 at::Tensor rows, at::Tensor grad, at::Tensor parts, int64_t path) {
  check_rows(student, "student");
  const int64_t N = student.size(0), V = student.size(1);
  KDArgs a;
  a.dtype = dtype_of(student, "student");
  TORCH_CHECK(teacher.dim() == 3 && teacher.size(0) == 1 && teacher.size(1) == N && teacher.size(2) == V &&
                  (V <= 1 || teacher.stride(2) == 1),
              "fastkd_cuda: teacher must be (1, N, V) with a unit column stride (one teacher), got ", teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "fastkd_cuda: teacher must have the student's dtype");
  check_same_device(teacher, student, "teacher");
  TORCH_CHECK(divergence >= 0 && divergence <= 6, "fastkd_cuda: divergence must be 0 to 6 (DKD, 7, is not in the "
              "CUDA kernels), got ", divergence);
  TORCH_CHECK(softcap == 0, "fastkd_cuda: softcap is not in the CUDA kernels (softcap must be 0, got ", softcap, ")");
  TORCH_CHECK(norm == 0, "fastkd_cuda: logit_norm is not in the CUDA kernels (norm must be 0, got ", norm, ")");
  TORCH_CHECK(path >= AUTO && path <= MULTI_PASS, "fastkd_cuda: path must be 0 (auto) to 3, got ", path);
  const bool need_grad = grad.size(0) > 0;
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == N && rows.is_contiguous() && rows.scalar_type() == at::kFloat,
              "fastkd_cuda: rows must be a contiguous (N,) float32 tensor");
  check_same_device(rows, student, "rows");
  if (return_parts) {
    TORCH_CHECK(parts.dim() == 2 && parts.size(0) == 2 && parts.size(1) == N && parts.is_contiguous() &&
                    parts.scalar_type() == at::kFloat,
                "fastkd_cuda: parts must be a contiguous (2, N) float32 tensor");
    check_same_device(parts, student, "parts");
  }
  if (need_grad) {
    check_rows(grad, "grad");
    check_same_device(grad, student, "grad");
    TORCH_CHECK(grad.sizes() == student.sizes() && grad.scalar_type() == student.scalar_type(),
                "fastkd_cuda: grad must be the student's shape and dtype");
  }
  const c10::cuda::CUDAGuard guard(student.device());
  if (student.numel() == 0) {
    rows.zero_();
    if (return_parts) parts.zero_();
    return;
  }
  at::Tensor t_keep, tt_keep, scale_keep;
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.N = N;
  a.V = V;
  a.sx = student.stride(0);
  a.st = teacher.stride(1);
  const bool has_target = target.has_value() && target->defined();
  if (has_target) {
    check_target(*target, student, N);
    a.target = target->data_ptr();
    a.target_int32 = target->scalar_type() == at::kInt;
  }
  a.grad = need_grad ? grad.data_ptr() : nullptr;
  a.sg = need_grad ? grad.stride(0) : 0;
  a.rows = rows.data_ptr<float>();
  a.parts = return_parts ? parts.data_ptr<float>() : nullptr;
  a.t_row = temperature(t, student, N, t_keep, &a.t_stride);
  a.tt_row = temperature(tt, student, N, tt_keep, &a.tt_stride);
  a.t_value = float(t_value);
  a.tt_value = float(tt_value);
  if (scale_tensor.has_value() && scale_tensor->defined()) {
    TORCH_CHECK(scale_tensor->numel() == 1, "fastkd_cuda: scale_tensor must hold one value");
    scale_keep = scale_tensor->to(student.device(), at::kFloat).contiguous();
    a.scale_ptr = scale_keep.data_ptr<float>();
  }
  a.scale = float(scale);
  a.scale_grad = scale_grad;
  a.alpha = float(alpha);
  a.beta = float(beta);
  a.skew = float(skew);
  a.ab_alpha = float(ab_alpha);
  a.ab_beta = float(ab_beta);
  a.eps = float(label_smoothing);
  a.ignore_index = ignore_index;
  a.divergence = int(divergence);
  a.t_squared = temperature_squared;
  a.has_kd = alpha > 0 || return_parts;
  a.has_ce = has_target && (alpha < 1 || return_parts);
  a.need_grad = need_grad;
  const char* err = kd_loss_launch(a, int(path), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "fastkd_cuda::kd_loss_fwd: ", err ? err : "");
}

int64_t kd_loss_path_of(int64_t V, int64_t path) {
  KDArgs a;
  a.V = V;
  return kd_loss_path(a, int(path));
}

void calibration_rows(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& t,
                      double t_value, int64_t ignore_index, int64_t n_bins, at::Tensor nll, at::Tensor brier,
                      at::Tensor conf, at::Tensor ok, at::Tensor bin) {
  check_rows(logits, "logits");
  const int64_t N = logits.size(0);
  CalibrationArgs a;
  a.dtype = dtype_of(logits, "logits");
  check_target(target, logits, N);
  TORCH_CHECK(n_bins >= 1, "fastkd_cuda: n_bins must be >= 1, got ", n_bins);
  auto check_out = [&](const at::Tensor& x, at::ScalarType dtype, const char* name) {
    TORCH_CHECK(x.dim() == 1 && x.size(0) == N && x.is_contiguous() && x.scalar_type() == dtype,
                "fastkd_cuda: ", name, " must be a contiguous (N,) ", dtype, " tensor");
    check_same_device(x, logits, name);
  };
  check_out(nll, at::kFloat, "nll");
  check_out(brier, at::kFloat, "brier");
  check_out(conf, at::kFloat, "conf");
  check_out(ok, at::kChar, "ok");
  check_out(bin, at::kInt, "bin");
  const c10::cuda::CUDAGuard guard(logits.device());
  if (N == 0) return;
  TORCH_CHECK(logits.size(1) > 0, "fastkd_cuda: logits must have at least one class");
  at::Tensor t_keep;
  a.logits = logits.data_ptr();
  a.target = target.data_ptr();
  a.target_int32 = target.scalar_type() == at::kInt;
  a.t_row = temperature(t, logits, N, t_keep, &a.t_stride);
  a.t_value = float(t_value);
  a.nll = nll.data_ptr<float>();
  a.brier = brier.data_ptr<float>();
  a.conf = conf.data_ptr<float>();
  a.ok = ok.data_ptr<int8_t>();
  a.bin = bin.data_ptr<int32_t>();
  a.N = N;
  a.C = logits.size(1);
  a.sx = logits.stride(0);
  a.ignore_index = ignore_index;
  a.n_bins = n_bins;
  const char* err = calibration_launch(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "fastkd_cuda::calibration_rows: ", err ? err : "");
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY(fastkd_cuda, m) {
  // fastkd_cpu's kd_loss_fwd schema, and ``path`` (launch.h's KDPath: 0 auto) to force a kernel.
  m.def("kd_loss_fwd(Tensor student, Tensor teacher, Tensor? target, Tensor? t, float t_value, Tensor? tt, "
        "float tt_value, Tensor? scale_tensor, float scale, bool scale_grad, float alpha, float beta, float skew, "
        "float ab_alpha, float ab_beta, float dkd_alpha, float dkd_beta, float softcap, float label_smoothing, "
        "float norm_scale, int ignore_index, "
        "int divergence, int norm, bool temperature_squared, bool return_parts, Tensor(a!) rows, Tensor(b!) grad, "
        "Tensor(c!) parts, int path=0) -> ()");
  m.def("kd_loss_path(int V, int path=0) -> int");
  // The calibration pass's per-row values; the float64 sums and bins' counts are torch ops on the device.
  m.def("calibration_rows(Tensor logits, Tensor target, Tensor? t, float t_value, int ignore_index, int n_bins, "
        "Tensor(a!) nll, Tensor(b!) brier, Tensor(c!) conf, Tensor(d!) ok, Tensor(e!) bin) -> ()");
  m.impl("kd_loss_path", &fastkd::cuda::kd_loss_path_of);
}

TORCH_LIBRARY_IMPL(fastkd_cuda, CUDA, m) {
  m.impl("kd_loss_fwd", &fastkd::cuda::kd_loss_fwd);
  m.impl("calibration_rows", &fastkd::cuda::calibration_rows);
}

TORCH_LIBRARY_IMPL(fastkd_cuda, Meta, m) {
  m.impl("kd_loss_fwd", [](const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, double, const c10::optional<at::Tensor>&, double,
                           const c10::optional<at::Tensor>&, double, bool, double, double, double, double, double, double,
                           double, double, double, double, int64_t, int64_t, int64_t, bool, bool, at::Tensor, at::Tensor, at::Tensor,
                           int64_t) {});
  m.impl("calibration_rows", [](const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, int64_t,
                                int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor) {});
}

#ifdef FASTKD_PYTHON_MODULE
// The ahead-of-time build is a Python extension module (fastkd._C_cuda): importing it registers the ops.
#include <Python.h>
#define FASTKD_STR2(x) #x
#define FASTKD_STR(x) FASTKD_STR2(x)
#define FASTKD_CAT2(a, b) a##b
#define FASTKD_CAT(a, b) FASTKD_CAT2(a, b)
static struct PyModuleDef fastkd_module = {PyModuleDef_HEAD_INIT, FASTKD_STR(FASTKD_PYTHON_MODULE), nullptr, -1, nullptr};
PyMODINIT_FUNC FASTKD_CAT(PyInit_, FASTKD_PYTHON_MODULE)(void) { return PyModule_Create(&fastkd_module); }
#endif
