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
//   divergence terms     a (log a - log b), 0 where a = 0 (NaN where a is NaN), and each divergence's
//                        D_j and g_j = dD/d(log q_j) (divergence_term)
//   mixtures             log m, m = w p + (1 - w) q (JSD, skew KL, skew reverse KL)
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

// The codes of kernels/kd_math.py's DIVERGENCES, all of which the Triton dense kernel runs (its sparse teacher's
// kernel those of kd_math.TOPK_DIVERGENCES; Triton's 8 and 9 are the alpha-beta divergence's limits, which
// divergence_term tells apart at run time); fastkd/backends/cpu.py lists them.
enum Divergence : int64_t {
  FORWARD_KL = 0, REVERSE_KL = 1, JSD = 2, SKEW_KL = 3, SKEW_REVERSE_KL = 4, TVD = 5, AB = 6, DKD = 7
};
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

// A row's divergence and its constants: the mixture weight w (JSD's beta; skew KL's and skew reverse KL's
// skew) with ln w and ln(1 - w); the alpha-beta divergence's a, b >= 0 (not both 0) and the factors of
// its terms; the smallest normal float (log_mixture). Built once per row on the host side of a kernel.
template <typename V>
struct DivergenceConstants {
  int64_t kind = FORWARD_KL;
  V w, w1, log_w, log_w1, tiny;
  bool has_a = true, has_b = false;
  V a, b, inv_a, inv_ab, inv_a2, inv_b2, a_frac, b_frac;
};

template <typename V, typename T>
FASTKD_INLINE DivergenceConstants<V> divergence_constants(int64_t kind, T beta, T skew, T a, T b, T tiny) {
  DivergenceConstants<V> c;
  c.kind = kind;
  const T w = kind == JSD ? beta : skew;
  c.w = V(w);
  c.w1 = V(T(1) - w);
  c.log_w = V(::log(w));
  c.log_w1 = V(::log1p(-w));
  c.tiny = V(tiny);
  c.has_a = a != T(0);
  c.has_b = b != T(0);
  c.a = V(a);
  c.b = V(b);
  c.inv_a = V(c.has_a ? T(1) / a : T(0));
  c.inv_ab = V(c.has_a && c.has_b ? T(1) / (a * b) : T(0));
  c.inv_a2 = V(c.has_a ? T(1) / (a * a) : T(0));
  c.inv_b2 = V(c.has_b ? T(1) / (b * b) : T(0));
  c.a_frac = V(a / (a + b));
  c.b_frac = V(b / (a + b));
  return c;
}

// The divergence's row-sum term D_j and g_j = dD/d(log q_j), entry by entry (p and the other log q fixed),
// p the teacher's probabilities, q the student's (fastkd.reference.kd_divergence states each D):
//   forward_kl       D_j = p (log p - log q),                                      g = -p
//   reverse_kl       D_j = q h, h = log q - log p,                                 g = q h
//   jsd              D_j = w p (log p - log m) + (1 - w) q (log q - log m),        g = (1 - w) q (log q - log m)
//                    m = w p + (1 - w) q, w = beta
//   skew_kl          D_j = p (log p - log m), m = w p + (1 - w) q,                g = -(1 - w) p q / m
//   skew_reverse_kl  D_j = q (log q - log m), m = (1 - w) p + w q,                g = D_j - w q q / m
//   tvd              D_j = |p - q| / 2,                                            g = q sign(q - p) / 2
//   dkd              D_j = p (log p - log q) and g = p: the sums decoupled KD needs (dkd_row below)
//   ab               D_j = -(p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)) / (a b), g = (q^(a+b) - p^a q^b) / a
//                    b = 0: (a p^a (log p - log q) - p^a + q^a) / a^2,           g = (q^a - p^a) / a
//                    a = 0: (b q^b (log q - log p) - q^b + p^b) / b^2,           g = q^b (log q - log p)
// A term is 0 where its weight (p or q, or p^a, q^b) is 0, and NaN where an input is NaN. ``diff`` is
// log p - log q, formed by the caller (exactly 0 where the two rows are equal). Exps per entry: JSD and the
// skew divergences one log (and skew KL / skew reverse KL one exp); ab up to 4 (p^a, q^b, p^(a+b), q^(a+b)).
template <typename Ops, typename V>
FASTKD_INLINE void divergence_term(const DivergenceConstants<V>& c, V p, V q, V log_p, V log_q, V diff, V* d, V* g) {
  const V zero(0);
  switch (c.kind) {
    case FORWARD_KL:
      *d = Ops::select(Ops::is_zero(p), zero, p * diff);
      *g = zero - p;
      return;
    case DKD:
      *d = Ops::select(Ops::is_zero(p), zero, p * diff);
      *g = p;
      return;
    case REVERSE_KL: {
      V qh = Ops::select(Ops::is_zero(q), zero, q * (zero - diff));
      *d = qh;
      *g = qh;
      return;
    }
    case JSD: {
      V log_m = log_mixture<Ops>(p, q, log_p, log_q, c.w, c.w1, c.log_w, c.log_w1, c.tiny);
      V qh = kl_term<Ops>(q, log_q, log_m);
      *d = c.w * kl_term<Ops>(p, log_p, log_m) + c.w1 * qh;
      *g = c.w1 * qh;
      return;
    }
    case SKEW_KL: {
      V log_m = log_mixture<Ops>(p, q, log_p, log_q, c.w, c.w1, c.log_w, c.log_w1, c.tiny);
      *d = kl_term<Ops>(p, log_p, log_m);
      *g = zero - c.w1 * Ops::select(Ops::is_neg_inf(log_m), zero, Ops::exp(log_p + log_q - log_m));
      return;
    }
    case SKEW_REVERSE_KL: {
      V log_m = log_mixture<Ops>(q, p, log_q, log_p, c.w, c.w1, c.log_w, c.log_w1, c.tiny);
      V qh = kl_term<Ops>(q, log_q, log_m);
      *d = qh;
      *g = qh - c.w * q * Ops::select(Ops::is_neg_inf(log_m), zero, Ops::exp(log_q - log_m));
      return;
    }
    case TVD: {
      // NaN compares false: |p - q| is then q - p (NaN), and 0 (q - p) carries the NaN into g.
      *d = V(0.5) * Ops::select(Ops::less(q, p), p - q, q - p);
      V sign = Ops::select(Ops::less(p, q), V(1), Ops::select(Ops::less(q, p), V(-1), zero));
      *g = V(0.5) * q * sign + zero * (q - p);
      return;
    }
    default: {  // AB
      if (c.has_a && c.has_b) {
        V pa = Ops::exp(c.a * log_p), qb = Ops::exp(c.b * log_q);
        V pab = Ops::exp((c.a + c.b) * log_p), qab = Ops::exp((c.a + c.b) * log_q);
        *d = (c.a_frac * pab + c.b_frac * qab - pa * qb) * c.inv_ab;
        *g = (qab - pa * qb) * c.inv_a;
      } else if (c.has_a) {
        V pa = Ops::exp(c.a * log_p), qa = Ops::exp(c.a * log_q);
        *d = (Ops::select(Ops::is_zero(pa), zero, c.a * pa * diff) - pa + qa) * c.inv_a2;
        *g = (qa - pa) * c.inv_a;
      } else {
        V qb = Ops::exp(c.b * log_q), pb = Ops::exp(c.b * log_p);
        V term = Ops::select(Ops::is_zero(qb), zero, qb * (zero - diff));
        *d = (c.b * term - qb + pb) * c.inv_b2;
        *g = Ops::select(Ops::is_zero(q), zero, term);
      }
    }
  }
}

// Decoupled KD (Zhao et al., CVPR 2022) of one row from its sums over the classes: a = p_y, b = q_y, A and B
// the teacher's and student's mass on the other classes (summed, not 1 - p_y), cross = sum_{j != y}
// p_j (log p_j - log q_j); weights w_t (TCKD) and w_n (NCKD). Returns D = w_t TCKD + w_n NCKD,
//   TCKD = a log(a / b) + A log(A / B),   NCKD = cross / A - log A + log B  (0 where A = 0),
// and sets the factors of its gradient dD/du_j = w_t kappa ([j = y] - q_j) + w_n (q_j / B - p_j / A)[j != y]:
// kappa = A b / B - a, inv_a = 1 / A and inv_b = 1 / B (0 where A = 0: no non-target distribution).
template <typename T>
FASTKD_INLINE T dkd_row(T a, T b, T A, T B, T cross, T w_t, T w_n, T* kappa, T* inv_a, T* inv_b) {
  using S = ScalarOps<T>;
  const T tckd = kl_term<S>(a, S::log(a), S::log(b)) + kl_term<S>(A, S::log(A), S::log(B));
  const bool rest = A > T(0);
  const T nckd = rest ? cross / A - S::log(A) + S::log(B) : T(0);
  *kappa = (B > T(0) ? A * b / B : T(0)) - a;
  *inv_a = rest ? T(1) / A : T(0);
  *inv_b = rest ? T(1) / B : T(0);
  return w_t * tckd + w_n * nckd;
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
