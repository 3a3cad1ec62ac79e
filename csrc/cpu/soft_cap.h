// Logit soft-capping z -> cap tanh(z / cap) (Gemma 2's final_logit_softcapping) over a row, and its
// gradient: the sparse teacher's kernel (kd_loss_topk.cpp) caps the student's row with these. The dense
// kernel (kd_loss.cpp) has its own copies, soft_cap and soft_cap_grad, of the same two loops: it can
// include this header in their place.
#pragma once

#include "common.h"

namespace fastkd {
namespace cpu {

// z -> cap tanh(z / cap) in place (-inf kept: a masked class stays masked; NaN stays NaN).
template <typename T>
inline void soft_cap_row(T* z, int64_t V, T cap) {
  using V_ = Vec<T>;
  const V_ vcap(cap), inv(T(1) / cap);
  for_each_vec<T>(V, [&](int64_t j, int64_t n) {
    V_ zj = V_::loadu(z + j, n);
    store(VecOps<T>::select(VecOps<T>::is_neg_inf(zj), zj, vcap * (zj * inv).tanh()), z + j, n);
  });
}

// dL/dz = dL/dz' (1 - (z' / cap)^2) from the capped row z', in place in g (0 at a masked class).
template <typename T>
inline void soft_cap_row_grad(T* g, const T* capped, int64_t V, T cap) {
  using V_ = Vec<T>;
  const V_ inv(T(1) / cap), one(T(1)), zero(T(0));
  for_each_vec<T>(V, [&](int64_t j, int64_t n) {
    V_ c = V_::loadu(capped + j, n);
    V_ r = c * inv;
    store(VecOps<T>::select(VecOps<T>::is_neg_inf(c), zero, V_::loadu(g + j, n) * (one - r * r)), g + j, n);
  });
}

}  // namespace cpu
}  // namespace fastkd
