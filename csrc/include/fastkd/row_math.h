// fastkd's per-row math: small inline functions shared by the C++ CPU kernels (csrc/cpu/) and, unchanged,
// by CUDA kernels (FASTKD_HOST_DEVICE is __host__ __device__ under nvcc). No ATen type appears here.
//
// Element functions are templates over a value type V and an ``Ops`` policy that supplies exp, log,
// comparisons and selection for V: ``ScalarOps<T>`` (below) for one float or double, the CPU kernels'
// ``VecOps<T>`` (csrc/cpu/common.h) for an at::vec::Vectorized<T> of them. The CPU's vectorized loops call
// these functions, so its tests test the math a GPU kernel including this header runs.
//
// The math (kernels/*.py module docs for the whole derivation):
//   online log-sum-exp   (m, d) with d = sum_j e^((x_j - m) k), merged as d = d_a e^((m_a - m) k) + d_b ...
//   divergence terms     a (log a - log b), 0 where a = 0 (NaN where a is NaN)
//   JSD mixture          log m, m = beta p + (1 - beta) q
//   CE with smoothing    (1 - eps) (m - x_y + ln d) + eps (m - mean x + ln d)
//   normalization        (r, kappa) of logit_norm, from the live entries' count and M2
//   confidence bins      bin m of M holds ((m - 1)/M, m/M], compared exactly (Dekker's split for float64)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTKD_HOST_DEVICE __host__ __device__
#else
#define FASTKD_HOST_DEVICE
#endif
#define FASTKD_INLINE FASTKD_HOST_DEVICE inline

namespace fastkd {

enum Divergence : int64_t { FORWARD_KL = 0, REVERSE_KL = 1, JSD = 2 };  // kernels/kd_math.py DIVERGENCES
enum Norm : int64_t { NO_NORM = 0, STANDARDIZE = 1, SPHERICAL = 2 };    // kernels/kd_loss.py NORMS
enum CalibrationMode : int64_t { BINS = 0, ROWS = 1, NEWTON = 2 };      // kernels/calibration.py MODES

constexpr double NORM_EPS = 1e-7;  // fastkd.reference.NORM_EPS

template <typename T>
FASTKD_INLINE T nan_of() { return T(NAN); }
template <typename T>
FASTKD_INLINE T inf_of() { return T(INFINITY); }

// ---- scalars ------------------------------------------------------------------------------------------

// The operations the element functions use, for one float or double.
template <typename T>
struct ScalarOps {
  using Mask = bool;
  FASTKD_INLINE static T exp(T x) { return ::exp(x); }
  FASTKD_INLINE static T log(T x) { return ::log(x); }
  FASTKD_INLINE static T max(T a, T b) { return a > b ? a : b; }  // a NaN b is dropped, as the kernels' maxima
  FASTKD_INLINE static bool is_zero(T x) { return x == T(0); }
  FASTKD_INLINE static bool less(T a, T b) { return a < b; }
  FASTKD_INLINE static bool is_neg_inf(T x) { return x == -inf_of<T>(); }
  FASTKD_INLINE static T select(bool mask, T if_true, T if_false) { return mask ? if_true : if_false; }
};

// 1/T for a temperature that is finite and > 0; NaN otherwise (an unchecked bad temperature: a NaN row).
template <typename T>
FASTKD_INLINE T inverse_temperature(T t) {
  return (t > T(0) && t < inf_of<T>()) ? T(1) / t : nan_of<T>();
}

// A row's running maximum m and sum d = sum_j e^((x_j - m) k), merged online.
template <typename T>
struct MaxSum {
  T m;
  T d;
};

// The pair of the union of two sets of entries. A side of no entries (m = -inf, d = 0) leaves the other.
template <typename T>
FASTKD_INLINE MaxSum<T> merge(MaxSum<T> a, MaxSum<T> b, T k) {
  T m = a.m > b.m ? a.m : b.m;
  if (m == -inf_of<T>()) return MaxSum<T>{m, a.d + b.d};
  T da = a.d == T(0) ? T(0) : a.d * ::exp((a.m - m) * k);
  T db = b.d == T(0) ? T(0) : b.d * ::exp((b.m - m) * k);
  return MaxSum<T>{m, da + db};
}

// (n, mean, M2) of the live entries of two parts, merged (Chan et al.).
template <typename T>
struct Moments {
  T n;
  T mean;
  T m2;
};

template <typename T>
FASTKD_INLINE Moments<T> merge(Moments<T> a, Moments<T> b) {
  T n = a.n + b.n;
  if (n == T(0)) return a;
  T delta = b.mean - a.mean;
  T frac = b.n / n;
  return Moments<T>{n, a.mean + delta * frac, a.m2 + b.m2 + delta * delta * a.n * frac};
}

// (r, kappa) of logit_norm for a row with n live entries and M2 = ||c||^2, c = x - mean: the normalized
// logits are c r, and dr/dx_j = -r^2 c_j / kappa (kappa = 0 for a constant row: no gradient through r).
template <typename T>
FASTKD_INLINE void norm_factor(T n, T m2, int64_t norm, T norm_scale, T* r, T* kappa) {
  if (norm == STANDARDIZE) {
    T dof = n - T(1) > T(1) ? n - T(1) : T(1);
    T sd = ::sqrt(m2 / dof);
    *r = T(1) / (sd + T(NORM_EPS));
    *kappa = dof * sd;
  } else if (norm == SPHERICAL) {
    T norm2 = ::sqrt(m2);
    *r = norm_scale / (norm2 + T(NORM_EPS));
    *kappa = norm_scale * norm2;
  } else {
    *r = T(1);
    *kappa = T(0);
  }
}

// The KD term's weight alpha c, c = T^2 (temperature_squared) or 1.
template <typename T>
FASTKD_INLINE T kd_weight(T alpha, T temperature, bool temperature_squared) {
  return alpha * (temperature_squared ? temperature * temperature : T(1));
}

// A row's loss from its parts: alpha KD + (1 - alpha) CE, without the 0 x inf of a part whose weight is 0.
template <typename T>
FASTKD_INLINE T total_loss(T alpha, T kd, T ce) {
  return alpha == T(1) ? kd : (alpha == T(0) ? ce : alpha * kd + (T(1) - alpha) * ce);
}

// CE of a row with label smoothing eps, from its max m, the target's logit x_y, ln d (d = sum e^(x - m))
// and the sum of its logits over V classes: (1 - eps)(-log s_y) + eps mean_j(-log s_j).
template <typename T>
FASTKD_INLINE T cross_entropy(T eps, int64_t n_classes, T m, T x_y, T ln_d, T sum_x) {
  T ce = (T(1) - eps) * ((m - x_y) + ln_d);
  if (eps > T(0)) ce += eps * ((m - sum_x / T(n_classes)) + ln_d);
  return ce;
}

// ---- element functions (V: a scalar or a vector of them; Ops: its operations) --------------------------

// a (log a - log b) per entry: 0 where a = 0, NaN where a is NaN.
template <typename Ops, typename V>
FASTKD_INLINE V kl_term(V a, V log_a, V log_b) {
  return Ops::select(Ops::is_zero(a), V(0), a * (log_a - log_b));
}

// log m, m = beta p + (1 - beta) q, from p, q and their logs (log_beta = ln beta, log_beta1 = ln(1 - beta)).
// Where m is below the smallest normal float its log is taken as max(ln beta + ln p, ln(1 - beta) + ln q),
// within ln 2 of it: every term that multiplies it is then below 1e-37.
template <typename Ops, typename V>
FASTKD_INLINE V log_mixture(V p, V q, V log_p, V log_q, V beta, V beta1, V log_beta, V log_beta1, V tiny) {
  V m = beta * p + beta1 * q;
  V exact = Ops::log(m);
  V bound = Ops::max(log_p + log_beta, log_q + log_beta1);
  return Ops::select(Ops::less(m, tiny), bound, exact);
}

// The divergence's row-sum term D_j and g_j = dD/d(log q_j), entry by entry (p and the other log q fixed):
//   forward_kl  D_j = p (log p - log q),                   g = -p
//   reverse_kl  D_j = q h, h = log q - log p,              g = q h
//   jsd         D_j = beta p (log p - log m) + (1 - beta) q (log q - log m),  g = (1 - beta) q (log q - log m)
// ``diff`` is log p - log q, formed by the caller (exactly 0 where the two rows are equal).
template <typename Ops, typename V>
FASTKD_INLINE void divergence_term(int64_t divergence, V p, V q, V log_p, V log_q, V diff, V beta, V beta1,
                                   V log_beta, V log_beta1, V tiny, V* d, V* g) {
  if (divergence == FORWARD_KL) {
    *d = Ops::select(Ops::is_zero(p), V(0), p * diff);
    *g = V(0) - p;
  } else if (divergence == REVERSE_KL) {
    V qh = Ops::select(Ops::is_zero(q), V(0), q * (V(0) - diff));
    *d = qh;
    *g = qh;
  } else {
    V log_m = log_mixture<Ops>(p, q, log_p, log_q, beta, beta1, log_beta, log_beta1, tiny);
    V qh = kl_term<Ops>(q, log_q, log_m);
    *d = beta * kl_term<Ops>(p, log_p, log_m) + beta1 * qh;
    *g = beta1 * qh;
  }
}

// Tempered softmax backward, dL/du_j from g_j = dL/dy_j and p_j, with c = sum g p (softmax) or sum g (log).
template <typename V>
FASTKD_INLINE V softmax_grad(bool log, V g, V p, V c) {
  return log ? g - p * c : p * (g - c);
}

// ---- calibration bins ---------------------------------------------------------------------------------

// ceil(c n) of the exact product, for float64 c in [0, 1] and 1 <= n < 2^26 (fastkd.reference's
// exact_ceil_product: Dekker's split makes hi n and lo n exact).
FASTKD_INLINE double exact_ceil_product(double c, int64_t n) {
  double t = c * 134217729.0;  // 2^27 + 1
  double hi = t - (t - c);
  double lo_n = (c - hi) * double(n);
  double hi_n = hi * double(n);
  double k = ::floor(hi_n);
  double f = hi_n - k;
  return k + (f <= -lo_n ? 0.0 : (f - 1.0 > -lo_n ? 2.0 : 1.0));
}

// The 0-based bin of a confidence among n_bins: ((m - 1)/M, m/M] is bin m - 1; 0 joins the first bin, a
// NaN confidence the last. A float confidence times M is exact in double; a double one takes Dekker's.
FASTKD_INLINE int64_t confidence_bin(float c, int64_t n_bins) {
  if (c != c) return n_bins - 1;
  double m = ::ceil(double(c) * double(n_bins));
  int64_t b = int64_t(m) - 1;
  return b < 0 ? 0 : (b > n_bins - 1 ? n_bins - 1 : b);
}

FASTKD_INLINE int64_t confidence_bin(double c, int64_t n_bins) {
  if (c != c) return n_bins - 1;
  int64_t b = int64_t(exact_ceil_product(c, n_bins)) - 1;
  return b < 0 ? 0 : (b > n_bins - 1 ? n_bins - 1 : b);
}

}  // namespace fastkd
