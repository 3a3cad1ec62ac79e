// The ops' kernels, one file each (softmax.cpp, kd_loss.cpp, kd_loss_topk.cpp, calibration.cpp,
// fidelity.cpp), as bindings.cpp registers them: included by both, so a signature that drifts fails to compile.
#pragma once

#include "common.h"

namespace fastkd {
namespace cpu {

void softmax_fwd(const at::Tensor&, const c10::optional<at::Tensor>&, double, bool, at::Tensor, at::Tensor);
void softmax_bwd(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, const at::Tensor&, bool,
                 at::Tensor, at::Tensor, bool, bool);
void kd_loss_fwd(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                 double, const c10::optional<at::Tensor>&, double, const c10::optional<at::Tensor>&, double, bool, double,
                 double, double, double, double, double, double, double, double, double, int64_t, int64_t, int64_t,
                 bool, bool, at::Tensor, at::Tensor, at::Tensor);
void kd_loss_topk_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                      const c10::optional<at::Tensor>&, double, const c10::optional<at::Tensor>&, double,
                      const c10::optional<at::Tensor>&, double, bool, double, double, double, double, double, double,
                      double, int64_t, int64_t, bool, bool, bool, at::Tensor, at::Tensor, at::Tensor);
void scale_grad_(at::Tensor, const at::Tensor&);
void calibration(const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&, double, bool, bool, int64_t,
                 int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor);
void fidelity(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, at::Tensor, at::Tensor);

}  // namespace cpu
}  // namespace fastkd
