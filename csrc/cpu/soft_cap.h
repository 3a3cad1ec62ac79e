// Logit soft-capping z -> cap tanh(z / cap) (Gemma 2's final_logit_softcapping) over a row, and its
// gradient, for the dense kernel (kd_loss.cpp: student and teachers) and the sparse teacher's (kd_loss_topk.cpp:
// the student).
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

// The row x as acc_t, soft-capped when cap > 0: the row itself (same type, no cap) or buf (V entries).
template <typename scalar_t, typename acc_t>
inline const acc_t* capped_row(const scalar_t* x, int64_t V, acc_t cap, acc_t* buf) {
  const acc_t* row = as_acc(x, V, buf);
  if (!(cap > acc_t(0))) return row;
  if (row != buf) std::copy(row, row + V, buf);
  soft_cap_row(buf, V, cap);
  return buf;
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
