// The distillation loss from a sparse teacher given at k entries per row (kernels/kd_loss_topk.py's module
// doc): each row's loss and dL/dx in the forward. Per row, in acc_t:
//   pass 1  max x (and sum x for label smoothing)
//   pass 2  e^(u_s), and CE's e^(x - max x) (powers of e^(u_s) at an integer T <= 8, common.h's ce_power;
//           else an exp): the only exps over the row (1 or 2 per entry), kept in row buffers; the
//           student's mass outside I is summed over those columns (the k entries zeroed in the buffer for
//           one sum, then put back), never taken as 1 - sum_I q
//   k + 1   the teacher's log-probabilities over I (and the bucket), the divergence over the k + 1 classes
//           by row_math.h's divergence_term (every divergence but DKD, which needs a dense teacher): its
//           D_c and g_c = dD/d(log q_c), G = sum_c g_c
//   pass 3  dL/dx by the formula of the columns outside I, q_l (g_R / q_R - G), then the k columns of I
//           set by their own, g_c - q_c G.
// With soft-capping (soft_cap.h), the student's row is first capped into a buffer (a tanh per entry; the
// teacher's stored values are not capped) and the gradient multiplied by the cap's derivative at the end.
#include "ops.h"
#include "soft_cap.h"

namespace fastkd {
namespace cpu {

template <typename T>
struct TopkParams {
  int64_t V = 0, k = 0, divergence = FORWARD_KL, ignore_index = -100;
  bool bucket = false, has_kd = false, has_ce = false, need_grad = false, scale_grad = true, t_squared = true;
  T alpha = 0, beta = 0.5, skew = 0.1, ab_alpha = 1, ab_beta = 0, eps = 0, scale = 1;
  T softcap = 0;  // > 0: the student's logits soft-capped to cap tanh(z / cap) before everything (CE included)
};

// One valid row: its KD part c D and CE part (unscaled; 0 where not computed) and its gradient in g.
template <typename T>
void topk_row(const TopkParams<T>& P, const T* x, const int64_t* idx, const T* v, int64_t y, T temperature, T inv_t,
              T inv_tt, T* g, T* work, T* small, T* kd_part, T* ce_part) {
  using V_ = Vec<T>;
  using S = ScalarOps<T>;
  const int64_t V = P.V, k = P.k;
  T* es = work;      // e^(u_s)
  T* e1 = work + V;  // e^(x - max x)
  T* saved = small;              // k: es at I while zeroed
  T* lq = small + k;             // k + 1: log q over I and R
  T* lp = small + 2 * k + 1;     // k + 1: log p
  T* gk = small + 3 * k + 2;     // k + 1: g_c = dD/d(log q_c)
  const T mx = row_max(x, V);
  const T x_y = (y >= 0 && y < V) ? x[y] : T(0);  // read first: g may be x itself (inplace_grad)
  const V_ vmx(mx);
  *kd_part = T(0);
  *ce_part = T(0);
  const bool kd_grad = P.need_grad && P.alpha > T(0);
  T w_ce = T(0), sum_x = T(0);
  if (P.has_ce) {
    w_ce = (y >= 0 && y < V) ? T(1) : nan_of<T>();  // an unchecked target outside [0, V): a NaN CE part
    if (P.eps > T(0)) {
      V_ s(T(0));
      for_each_vec<T>(V, [&](int64_t j, int64_t n) { s += load0(x + j, n); });
      sum_x = hsum(s);
    }
  }
  bool in_range = true;
  for (int64_t c = 0; c < k; ++c) in_range = in_range && idx[c] >= 0 && idx[c] < V;
  const T k_s = inv_t;
  const int ce_pow = P.has_kd && P.has_ce ? ce_power(temperature, NO_NORM) : 0;  // CE's exps: powers of es
  T ds = T(0), d1 = T(0);
  {
    const V_ vks(k_s);
    const bool kd_exps = P.has_kd, ce_exps = P.has_ce && ce_pow == 0;
    with_power(ce_pow, [&](auto power) {
      constexpr int CE_POW = decltype(power)::value;
      const auto sums = row_sums<T, 2>(V, [&](int64_t j, int64_t n, auto& s) {
        V_ z = load(x + j, n) - vmx;
        if (kd_exps) {
          V_ e = vexp(z * vks);
          store(e, es + j, n);
          s[0] += e;
          if constexpr (CE_POW > 1) s[1] += vpow<CE_POW>(e);
        }
        if (ce_exps) {
          V_ e = vexp(z);
          store(e, e1 + j, n);
          s[1] += e;
        }
      });
      ds = sums[0];
      d1 = CE_POW == 1 ? ds : sums[1];
    });
  }
  const T gscale = P.scale_grad ? P.scale : T(1);
  if (P.has_kd && !in_range) {  // an unchecked index outside [0, V): a NaN row
    *kd_part = nan_of<T>();
    if (kd_grad) std::fill(g, g + V, nan_of<T>());
  } else if (P.has_kd) {
    // the student's mass outside I, summed over those columns
    for (int64_t c = 0; c < k; ++c) {
      saved[c] = es[idx[c]];
      es[idx[c]] = T(0);
    }
    const T rest = row_sums<T, 1>(V, [&](int64_t j, int64_t n, auto& s) { s[0] += V_::loadu(es + j, n); })[0];
    for (int64_t c = k - 1; c >= 0; --c) es[idx[c]] = saved[c];
    const T ln_ds = std::log(ds);
    for (int64_t c = 0; c < k; ++c) lq[c] = (x[idx[c]] - mx) * k_s - ln_ds;
    lq[k] = rest > T(0) ? std::log(rest) - ln_ds : neg_inf<T>();
    // the teacher: log_softmax of v / T_t over I (and the bucket ln(1 - sum_I e^v))
    const int64_t classes = P.bucket ? k + 1 : k;
    T vmax = neg_inf<T>();
    T mass = T(0);
    for (int64_t c = 0; c < k; ++c) {
      lp[c] = v[c] * inv_tt;
      mass += std::exp(v[c]);
    }
    if (P.bucket) lp[k] = std::log1p(-std::min(mass, T(1))) * inv_tt;
    for (int64_t c = 0; c < classes; ++c) vmax = S::max(vmax, lp[c]);
    T tsum = T(0);
    for (int64_t c = 0; c < classes; ++c) tsum += std::exp(lp[c] - vmax);
    const T lse = vmax + std::log(tsum);
    for (int64_t c = 0; c < classes; ++c) lp[c] = lp[c] - lse;
    if (!P.bucket) lp[k] = neg_inf<T>();
    if (inv_tt != inv_tt) {  // an unchecked bad teacher temperature: NaN
      for (int64_t c = 0; c <= k; ++c) lp[c] = nan_of<T>();
    }
    // the divergence over the k + 1 classes: D and g_c = dD/d(log q_c) (row_math.h), G = sum_c g_c
    const auto dc = divergence_constants<T, T>(P.divergence, P.beta, P.skew, P.ab_alpha, P.ab_beta,
                                               std::numeric_limits<T>::min());
    T D = T(0), G = T(0);
    for (int64_t c = 0; c <= k; ++c) {
      const T p = std::exp(lp[c]), q = std::exp(lq[c]);
      T d;
      divergence_term<S>(dc, p, q, lp[c], lq[c], lp[c] - lq[c], &d, &gk[c]);
      D += d;
      G += gk[c];
    }
    *kd_part = kd_weight(T(1), temperature, P.t_squared) * D;
    if (kd_grad) {
      // dD/du_l = g_c(l) (q_l / q_R for l outside I) - q_l G: outside I q_l (g_R / q_R - G), at I g_c - q_c G
      const T w = kd_weight(P.alpha, temperature, P.t_squared) * k_s * gscale;
      const T ratio = lq[k] > neg_inf<T>() ? gk[k] * std::exp(-lq[k]) : T(0);
      const V_ vf(w * (ratio - G)), inv_ds(T(1) / ds);
      for_each_vec<T>(V, [&](int64_t j, int64_t n) { store(vf * V_::loadu(es + j, n) * inv_ds, g + j, n); });
      for (int64_t c = 0; c < k; ++c) g[idx[c]] = w * (gk[c] - (es[idx[c]] / ds) * G);
    }
  }
  if (P.need_grad && !kd_grad) std::fill(g, g + V, T(0));  // after the last read of x (g may be x)
  if (P.has_ce) {
    const T ln_d1 = std::log(d1);
    *ce_part = w_ce * cross_entropy(P.eps, V, mx, x_y, ln_d1, sum_x);
    if (P.need_grad && P.alpha < T(1)) {
      const T wc = w_ce * (T(1) - P.alpha) * gscale;
      const V_ vw(wc), inv(T(1) / d1), off(P.eps / T(V));
      with_power(ce_pow, [&](auto power) {
        constexpr int CE_POW = decltype(power)::value;
        for_each_vec<T>(V, [&](int64_t j, int64_t n) {
          V_ e;
          if constexpr (CE_POW > 0) e = vpow<CE_POW>(V_::loadu(es + j, n));
          else e = V_::loadu(e1 + j, n);
          store(V_::loadu(g + j, n) + vw * (e * inv - off), g + j, n);
        });
      });
      if (y >= 0 && y < V) g[y] -= wc * (T(1) - P.eps);
    }
  }
}

template <typename x_t, typename acc_t>
void topk_kernel(const TopkParams<acc_t>& P, const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,
                 const Target& target, const Temperature<acc_t>& temp, const Temperature<acc_t>& ttemp, at::Tensor& rows,
                 at::Tensor& grad, acc_t* pp) {
  const int64_t N = student.size(0), V = P.V, k = P.k;
  const x_t* xp = student.data_ptr<x_t>();
  acc_t* rp = rows.data_ptr<acc_t>();
  x_t* gp = P.need_grad ? grad.data_ptr<x_t>() : nullptr;
  const int64_t sx = student.stride(0), sg = P.need_grad ? grad.stride(0) : 0;
  const int64_t si = indices.stride(0), sv = values.stride(0), sic = k > 1 ? indices.stride(1) : 1,
                svc = k > 1 ? values.stride(1) : 1;
  const bool idx64 = indices.scalar_type() == at::kLong;
  const void* ip = indices.data_ptr();
  constexpr bool same = std::is_same_v<x_t, acc_t>;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "fastkd_cpu::topk_values", [&] {
    using value_t = scalar_t;
    const value_t* vp = values.data_ptr<value_t>();
    parallel_rows(N, grain(V), [&](const auto& blocks) {
      const bool cap = P.softcap > acc_t(0);  // the capped row lives in xbuf
      std::vector<acc_t> work(2 * V), xbuf(same && !cap ? 0 : V), gbuf(same ? 0 : V), small(4 * k + 3), vbuf(k);
      std::vector<int64_t> ibuf(k);
      blocks([&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t y = target.present() ? target[i] : -1;
          if (target.present() && y == P.ignore_index) {
            ignore_row(i, N, rp, pp, P.need_grad ? gp + i * sg : nullptr, V);
            continue;
          }
          for (int64_t c = 0; c < k; ++c) {
            ibuf[c] = idx64 ? static_cast<const int64_t*>(ip)[i * si + c * sic]
                            : int64_t(static_cast<const int32_t*>(ip)[i * si + c * sic]);
            vbuf[c] = acc_t(vp[i * sv + c * svc]);
          }
          auto* grow = P.need_grad ? gp + i * sg : nullptr;
          const acc_t* x = capped_row(xp + i * sx, V, P.softcap, xbuf.data());
          acc_t* g = P.need_grad ? acc_out(grow, gbuf.data()) : nullptr;
          acc_t kd, ce;
          topk_row(P, x, ibuf.data(), vbuf.data(), y, temp.value(i), temp.inverse(i), ttemp.inverse(i), g, work.data(),
                   small.data(), &kd, &ce);
          store_row_loss(i, N, rp, pp, P.alpha, kd, ce, P.scale);
          if (P.need_grad) {
            if (cap) soft_cap_row_grad(g, x, V, P.softcap);
            finish_out(g, grow, V);
          }
        }
      });
    });
  });
}

void kd_loss_topk_fwd(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,
                      const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& t, double t_value,
                      const c10::optional<at::Tensor>& tt, double tt_value, const c10::optional<at::Tensor>& scale_tensor,
                      double scale, bool scale_grad, double alpha, double beta, double skew, double ab_alpha,
                      double ab_beta, double softcap, double label_smoothing, int64_t ignore_index, int64_t divergence,
                      bool bucket, bool temperature_squared, bool return_parts, at::Tensor rows, at::Tensor grad,
                      at::Tensor parts) {
  check_rows(student, "student");
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == N && values.sizes() == indices.sizes(),
              "fastkd_cpu: indices and values must be (N, k), got ", indices.sizes(), " and ", values.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "fastkd_cpu: indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.device().is_cpu() && values.device().is_cpu(), "fastkd_cpu: indices and values must be CPU tensors");
  check_target(target, N);
  TORCH_CHECK(divergence >= FORWARD_KL && divergence <= AB, "fastkd_cpu: divergence must be in [0, 6] (DKD needs a "
              "dense teacher), got ", divergence);
  TORCH_CHECK(divergence != AB || ab_alpha > 0 || ab_beta > 0, "fastkd_cpu: ab_alpha and ab_beta must not both be 0");
  const bool need_grad = grad.size(0) > 0;
  const auto acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == N && rows.is_contiguous() && rows.scalar_type() == acc_type,
              "fastkd_cpu: rows must be a contiguous (N,) tensor of the math dtype ", acc_type);
  if (return_parts) {
    TORCH_CHECK(parts.dim() == 2 && parts.size(0) == 2 && parts.size(1) == N && parts.is_contiguous() &&
                    parts.scalar_type() == acc_type,
                "fastkd_cpu: parts must be a contiguous (2, N) tensor of the math dtype ", acc_type);
  }
  if (need_grad) {
    check_rows(grad, "grad");
    TORCH_CHECK(grad.sizes() == student.sizes() && grad.scalar_type() == student.scalar_type(),
                "fastkd_cpu: grad must be the student's shape and dtype");
  }
  if (student.numel() == 0) {
    rows.zero_();
    if (return_parts) parts.zero_();
    return;
  }
  FASTKD_DISPATCH(student.scalar_type(), "fastkd_cpu::kd_loss_topk_fwd", [&] {
    TopkParams<acc_t> P;
    P.V = V;
    P.k = indices.size(1);
    P.divergence = divergence;
    P.ignore_index = ignore_index;
    P.bucket = bucket && P.k < V;
    P.has_kd = alpha > 0 || return_parts;
    P.has_ce = target.has_value() && target->defined() && (alpha < 1 || return_parts);
    P.need_grad = need_grad;
    P.scale_grad = scale_grad;
    P.t_squared = temperature_squared;
    P.alpha = acc_t(alpha);
    P.beta = acc_t(beta);
    P.skew = acc_t(skew);
    P.ab_alpha = acc_t(ab_alpha);
    P.ab_beta = acc_t(ab_beta);
    P.softcap = acc_t(softcap);
    P.eps = acc_t(label_smoothing);
    P.scale = (scale_tensor.has_value() && scale_tensor->defined()) ? acc_t(scale_tensor->item<double>()) : acc_t(scale);
    Temperature<acc_t> temp(t, t_value, N), ttemp(tt, tt_value, N);
    topk_kernel<scalar_t, acc_t>(P, student, indices, values, Target(target), temp, ttemp, rows, grad,
                                 return_parts ? parts.data_ptr<acc_t>() : nullptr);
  });
}

}  // namespace cpu
}  // namespace fastkd
