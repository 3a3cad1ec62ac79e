// The dense distillation loss: each row's loss and dL/dx in the forward (kernels/kd_loss.py's module doc
// for the math), and the backward's in-place scale of that gradient.
//
// Per row, in acc_t (float32; float64 for float64 logits):
//   pass 1  max x, max t_k; sum x (label smoothing); the live entries' moments (logit_norm, two reads)
//   pass 2  e^(u_s) and e^(u_tk), kept in per-thread row buffers for the passes below, and CE's
//           e^(x - max x): at an integer T <= 8 without logit_norm the power (e^(u_s))^T (a few multiplies),
//           else its own exp. Exps per entry: 1 + K, + 1 for CE at any other T. Forward KL of one teacher
//           (no logit_norm) also sums E_f = sum e^(u_t) (u_t - u_s) here: KL = E_f / d_t - ln d_t + ln d_s
//           (kernels/kd_loss.py's module doc), and skips pass 3.
//   pass 3  the divergence's terms from the buffers (row_math.h's divergence_term: reverse KL and TVD no
//           exp, JSD a log per entry, skew KL and skew reverse KL a log and an exp, the alpha-beta
//           divergence 2 to 4 exps; an ensemble one log more): the row sum D and g = dD/d(log q) into a
//           buffer
//   pass 4  dL/dx = alpha c k_s (g - q G [through the normalization]) + (1 - alpha)(s - eps/V), written
//           once in the student's dtype, then the -(1 - alpha)(1 - eps) at the target.
// With soft-capping (soft_cap.h), each row is first capped into a buffer (a tanh per entry of student and
// teachers) and the gradient multiplied by the cap's derivative at the end.
// The buffers are per thread, a few rows of V each: nothing N x V is allocated beyond the gradient.
#include "ops.h"
#include "soft_cap.h"

namespace fastkd {
namespace cpu {

template <typename T>
struct KDParams {
  int64_t V = 0, K = 1, divergence = FORWARD_KL, norm = NO_NORM, ignore_index = -100;
  bool has_kd = false, has_ce = false, need_grad = false, scale_grad = true, t_squared = true;
  T alpha = 0, beta = 0.5, skew = 0.1, ab_alpha = 1, ab_beta = 0, eps = 0, norm_scale = 2, scale = 1;
  T dkd_alpha = 1, dkd_beta = 8;  // DKD's weights of TCKD and NCKD
  T softcap = 0;  // > 0: logits soft-capped to cap tanh(z / cap) before everything (CE included)
};

// (n, mean, M2) of a row's live (not -inf) entries, of x - shift (two reads: the mean, then M2).
template <typename T>
inline Moments<T> live_moments(const T* x, int64_t V, T shift) {
  using V_ = Vec<T>;
  using Ops = VecOps<T>;
  const V_ vs(shift), zero(T(0)), one(T(1));
  V_ n(T(0)), s(T(0));
  for_each_vec<T>(V, [&](int64_t j, int64_t c) {
    V_ xj = load(x + j, c);
    V_ dead = Ops::is_neg_inf(xj);
    n += Ops::select(dead, zero, one);
    s += Ops::select(dead, zero, xj - vs);
  });
  const T count = hsum(n);
  const T mean = hsum(s) / std::max(count, T(1));
  const V_ vmean(mean);
  V_ m2(T(0));
  for_each_vec<T>(V, [&](int64_t j, int64_t c) {
    V_ xj = load(x + j, c);
    V_ d = xj - vs - vmean;
    m2 += Ops::select(Ops::is_neg_inf(xj), zero, d * d);
  });
  return Moments<T>{count, mean, hsum(m2)};
}

// The sum of v over [0, V) but the entry at skip (in [0, V)), excluded exactly.
template <typename T>
inline T sum_except(const T* v, int64_t V, int64_t skip) {
  Vec<T> s(T(0));
  for_each_vec<T>(skip, [&](int64_t j, int64_t n) { s += Vec<T>::loadu(v + j, n); });
  for_each_vec<T>(V - skip - 1, [&](int64_t j, int64_t n) { s += Vec<T>::loadu(v + skip + 1 + j, n); });
  return hsum(s);
}

// Decoupled KD's row sum D, from e^(u_s) (es; q = es / d_s, inv_ds = 1 / d_s), p (gb) and p (log p -
// log q) (cross) of every class; writes into gb its g with dD/du = g - q G (G returned in *G), as every
// divergence's: w_n (q_j / B - p_j / A) off the target, w_t kappa at it (row_math.h's dkd_row). An
// unchecked target outside [0, V): NaN.
template <typename T>
T dkd_terms(const KDParams<T>& P, int64_t y, const T* es, T inv_ds, T* gb, const T* cross, T* G) {
  using V_ = Vec<T>;
  const int64_t V = P.V;
  if (y < 0 || y >= V) {
    std::fill(gb, gb + V, nan_of<T>());
    *G = nan_of<T>();
    return nan_of<T>();
  }
  T kappa, inv_a, inv_b;
  const T D = dkd_row(gb[y], es[y] * inv_ds, sum_except(gb, V, y), sum_except(es, V, y) * inv_ds,
                      sum_except(cross, V, y), P.dkd_alpha, P.dkd_beta, &kappa, &inv_a, &inv_b);
  const V_ wa(P.dkd_beta * inv_a), wb(P.dkd_beta * inv_b * inv_ds);
  for_each_vec<T>(V, [&](int64_t j, int64_t n) {
    store(V_::loadu(es + j, n) * wb - V_::loadu(gb + j, n) * wa, gb + j, n);
  });
  gb[y] = P.dkd_alpha * kappa;
  *G = P.dkd_alpha * kappa;
  return D;
}

// Pass 2 over a row, base 2 with log2(e) in the scales: es = 2^(w_s), w_s = (x - mx) cs; CE's exps, as
// es^CE_POW (CE_POW > 1; es itself at 1) or its own e1 = e^(x - mx) (CE_POW = 0, with ce_exps); with ONLINE
// (forward KL of one teacher t), tb = 2^(w_t), w_t = (t - mt) ct, and E_f = sum tb (w_t - w_s) (0 where tb
// is 0) in log2 units. Returns {d_s, CE's d_1 (CE_POW > 1 or 0), d_t, E_f}, sums over the row.
template <int CE_POW, bool ONLINE, typename T>
std::array<T, 4> exps_pass(const T* x, const T* t, int64_t V, T mx, T cs, T mt, T ct, bool ce_exps, T* es, T* e1,
                           T* tb) {
  using V_ = Vec<T>;
  using Ops = VecOps<T>;
  const V_ vmx(mx), vcs(cs), vmt(mt), vct(ct), zero(T(0));
  return row_sums<T, 4>(V, [&](int64_t j, int64_t n, auto& s) {
    V_ z = load(x + j, n) - vmx;
    V_ w_s = z * vcs;
    V_ e = vexp2(w_s);
    store(e, es + j, n);
    s[0] += e;
    if constexpr (CE_POW > 1) {
      s[1] += vpow<CE_POW>(e);
    } else if constexpr (CE_POW == 0) {
      if (ce_exps) {
        V_ e_1 = vexp(z);
        store(e_1, e1 + j, n);
        s[1] += e_1;
      }
    }
    if constexpr (ONLINE) {
      V_ w_t = (load(t + j, n) - vmt) * vct;
      V_ f = vexp2(w_t);
      store(f, tb + j, n);
      s[2] += f;
      s[3] = at::vec::fmadd(f, Ops::select(Ops::is_zero(f), zero, w_t - w_s), s[3]);  // 0 where p is 0
    }
  });
}

// g = kd(j) + ce(j) over the row, a vector at a time: the row's gradient written once.
template <typename T, typename KD, typename CE>
inline void write_grad(T* g, int64_t V, const KD& kd, const CE& ce) {
  for_each_vec<T>(V, [&](int64_t j, int64_t n) { store(kd(j, n) + ce(j, n), g + j, n); });
}

// One valid row: its KD part c D and CE part (unscaled; 0 where not computed), and its gradient (scaled
// as out says) in g. x: the student's row, t[k]: the teachers' rows, all acc_t; work: (3 + K) V entries.
template <typename T>
void kd_row(const KDParams<T>& P, const T* x, const T* const* t, int64_t y, T temperature, T inv_t, T inv_tt,
            T* g, T* work, T* kd_part, T* ce_part) {
  using V_ = Vec<T>;
  using Ops = VecOps<T>;
  const int64_t V = P.V, K = P.K;
  const V_ zero(T(0));
  T* es = work;          // e^(u_s)
  T* e1 = work + V;      // e^(x - max x) for CE, where not a power of es (ce_power)
  T* gb = work + 2 * V;  // g = dD/d(log q)
  T* tb = work + 3 * V;  // teacher k's e^(u_tk) at tb + k V; p of an ensemble at tb

  // max x, and the first teacher's max in the same read where it is needed
  const auto maxes = P.has_kd ? row_max2(x, t[0], V) : std::array<T, 2>{row_max(x, V), T(0)};
  const T mx = maxes[0];
  const T x_y = (y >= 0 && y < V) ? x[y] : T(0);  // read first: g may be x itself (inplace_grad)
  const V_ vmx(mx);
  *kd_part = T(0);
  *ce_part = T(0);
  const bool kd_grad = P.need_grad && P.alpha > T(0) && P.has_kd;
  const bool ce_grad = P.need_grad && P.alpha < T(1) && P.has_ce;

  // CE's statistics: its weight (NaN for an unchecked target outside [0, V)), sum x.
  T w_ce = T(0), sum_x = T(0);
  if (P.has_ce) {
    w_ce = (y >= 0 && y < V) ? T(1) : nan_of<T>();  // an unchecked target outside [0, V): a NaN CE part
    if (P.eps > T(0)) {
      V_ s(T(0));
      for_each_vec<T>(V, [&](int64_t j, int64_t n) { s += load0(x + j, n); });
      sum_x = hsum(s);
    }
  }
  // CE's exps: powers of es (ce_pow > 0), or their own in e1.
  const int ce_pow = P.has_ce && P.has_kd ? ce_power(temperature, P.norm) : 0;
  const bool ce_exps = P.has_ce && ce_pow == 0;
  // Forward KL of one teacher without logit_norm: its row sum from the exps' pass (the Triton kernel's
  // E_f: KL(p || q) = E_f / d_t - ln d_t + ln d_s, E_f = sum e^v (v - u)) and its g = -p from the
  // buffers: no divergence pass.
  const bool online = P.divergence == FORWARD_KL && K == 1 && P.norm == NO_NORM;

  T k_s = inv_t, r_s = T(1), kappa = T(0), live_n = T(0), mean_y = T(0);
  T ds = T(1), d1 = T(0), D = T(0), G = T(0);
  c10::SmallVector<T, 4> mt(K), kt(K), dt(K);
  if (P.has_kd) {
    if (P.norm != NO_NORM) {
      Moments<T> mo = live_moments(x, V, mx);
      live_n = mo.n;
      mean_y = mo.mean;
      norm_factor(mo.n, mo.m2, P.norm, P.norm_scale, &r_s, &kappa);
      k_s = r_s * inv_t;
    }
    for (int64_t k = 0; k < K; ++k) {
      mt[k] = k == 0 ? maxes[1] : row_max(t[k], V);
      T r_t = T(1), kappa_t = T(0);
      if (P.norm != NO_NORM) {
        Moments<T> mo = live_moments(t[k], V, mt[k]);
        norm_factor(mo.n, mo.m2, P.norm, P.norm_scale, &r_t, &kappa_t);
      }
      kt[k] = r_t * inv_tt;
    }
    // pass 2: the exps (the student's, CE's, and with ``online`` the teacher's and E_f), base 2 with log2(e)
    // folded into the scales: e^(u_s) = 2^(w_s), w_s = (x - max x) k_s log2(e)
    const V_ vks(k_s), vmt(mt[0]);
    with_power(ce_pow, [&](auto power) {
      constexpr int CE_POW = decltype(power)::value;
      const auto pass = online ? exps_pass<CE_POW, true, T> : exps_pass<CE_POW, false, T>;
      const auto sums = pass(x, t[0], V, mx, k_s * T(LOG2E), mt[0], kt[0] * T(LOG2E), ce_exps, es, e1, tb);
      ds = sums[0];
      d1 = CE_POW == 1 ? ds : sums[1];
      if (online) {
        dt[0] = sums[2];
        D = T(1 / LOG2E) * sums[3] / dt[0] - std::log(dt[0]) + std::log(ds);
        G = T(-1);
      }
    });
    if (!online) {
      for (int64_t k = 0; k < K; ++k) {
        const V_ vmtk(mt[k]), vctk(kt[k] * T(LOG2E));
        const T* tk_row = t[k];
        T* tk = tb + k * V;
        dt[k] = row_sums<T, 1>(V, [&](int64_t j, int64_t n, auto& s) {
          V_ f = vexp2((load(tk_row + j, n) - vmtk) * vctk);
          store(f, tk + j, n);
          s[0] += f;
        })[0];
      }
      // pass 3: the divergence's terms, g into gb
      const T ln_ds = std::log(ds);
      const V_ inv_ds(T(1) / ds), vln_ds(ln_ds);
      const auto dc = divergence_constants<V_, T>(P.divergence, P.beta, P.skew, P.ab_alpha, P.ab_beta,
                                                  std::numeric_limits<T>::min());
      const bool dkd = P.divergence == DKD;  // p into gb, its cross terms into tb, for dkd_terms below
      std::array<T, 2> sums;  // D, G
      if (K == 1) {
        const V_ inv_dt(T(1) / dt[0]);
        const T ln_dt = std::log(dt[0]);
        const V_ vln_dt(ln_dt), c(ln_dt - ln_ds), vkt(kt[0]);
        sums = row_sums<T, 2>(V, [&](int64_t j, int64_t n, auto& s) {
          V_ us = (load(x + j, n) - vmx) * vks, ut = (load(t[0] + j, n) - vmt) * vkt;
          V_ q = V_::loadu(es + j, n) * inv_ds, p = V_::loadu(tb + j, n) * inv_dt;
          V_ d, gj;
          divergence_term<Ops>(dc, p, q, ut - vln_dt, us - vln_ds, (ut - us) - c, &d, &gj);
          s[0] += d;
          s[1] += gj;
          store(gj, gb + j, n);
          if (dkd) store(d, tb + j, n);
        });
      } else {
        c10::SmallVector<T, 4> inv_dtk(K);
        for (int64_t k = 0; k < K; ++k) inv_dtk[k] = T(1) / (dt[k] * T(K));
        sums = row_sums<T, 2>(V, [&](int64_t j, int64_t n, auto& s) {
          V_ p(T(0));
          for (int64_t k = 0; k < K; ++k) p += V_::loadu(tb + k * V + j, n) * V_(inv_dtk[k]);
          V_ us = (load(x + j, n) - vmx) * vks;
          V_ q = V_::loadu(es + j, n) * inv_ds;
          V_ lp = vlog(p), lq = us - vln_ds;
          V_ d, gj;
          divergence_term<Ops>(dc, p, q, lp, lq, lp - lq, &d, &gj);
          s[0] += d;
          s[1] += gj;
          store(gj, gb + j, n);
          if (dkd) store(d, tb + j, n);  // the teachers' exps at j are read above
        });
      }
      D = sums[0];
      G = sums[1];
      if (dkd) D = dkd_terms(P, y, es, T(1) / ds, gb, tb, &G);
    }
    *kd_part = kd_weight(T(1), temperature, P.t_squared) * D;
  } else if (P.has_ce) {
    d1 = row_sums<T, 1>(V, [&](int64_t j, int64_t n, auto& s) {
      V_ e = vexp(load(x + j, n) - vmx);
      store(e, e1 + j, n);
      s[0] += e;
    })[0];
  }
  if (P.has_ce) *ce_part = w_ce * cross_entropy(P.eps, V, mx, x_y, std::log(d1), sum_x);
  if (!P.need_grad) return;

  // pass 4: dL/dx = alpha c k_s (g - q G [through the normalization]) + (1 - alpha)(s - eps/V), one write
  const T gscale = P.scale_grad ? P.scale : T(1);
  // The weights folded into each term's scale: one fma per term and entry.
  const T wc = w_ce * (T(1) - P.alpha) * gscale;
  const V_ ce_scale(wc / d1), ce_off(-wc * P.eps / T(V));
  auto with_ce = [&](const auto& kd) {
    if (!ce_grad) {
      write_grad(g, V, kd, [=](int64_t, int64_t) { return zero; });
      return;
    }
    with_power(ce_pow, [&](auto power) {
      constexpr int CE_POW = decltype(power)::value;
      write_grad(g, V, kd, [=](int64_t j, int64_t n) {
        if constexpr (CE_POW > 0) return at::vec::fmadd(vpow<CE_POW>(V_::loadu(es + j, n)), ce_scale, ce_off);
        else return at::vec::fmadd(V_::loadu(e1 + j, n), ce_scale, ce_off);
      });
    });
  };
  const T kd_w = kd_weight(P.alpha, temperature, P.t_squared) * k_s * gscale;
  const V_ w(kd_w);
  if (!kd_grad) {
    with_ce([=](int64_t, int64_t) { return zero; });
  } else if (online) {
    const V_ q_scale(kd_w / ds), p_scale(kd_w / dt[0]);
    with_ce([=](int64_t j, int64_t n) {
      return at::vec::fmsub(V_::loadu(es + j, n), q_scale, V_::loadu(tb + j, n) * p_scale);
    });
  } else if (P.norm == NO_NORM) {
    const V_ qG(kd_w * G / ds);
    with_ce([=](int64_t j, int64_t n) { return at::vec::fnmadd(V_::loadu(es + j, n), qG, V_::loadu(gb + j, n) * w); });
  } else {  // through the normalization: e - c W - mean(e - c W), 0 at -inf entries
    const V_ vmean(mean_y), qG(G / ds);
    const auto sums = row_sums<T, 3>(V, [&](int64_t j, int64_t n, auto& s) {  // e, e c, c
      V_ xj = load(x + j, n);
      V_ dead = Ops::is_neg_inf(xj);
      V_ c = Ops::select(dead, zero, xj - vmx - vmean);
      V_ e = Ops::select(dead, zero, V_::loadu(gb + j, n) - V_::loadu(es + j, n) * qG);
      store(e, gb + j, n);
      s[0] += e;
      s[1] += e * c;
      s[2] += c;
    });
    const T W = kappa > T(0) ? r_s * sums[1] / kappa : T(0);
    const T e_mean = (sums[0] - sums[2] * W) / std::max(live_n, T(1));
    const V_ vW(W), vem(e_mean);
    with_ce([=](int64_t j, int64_t n) {
      V_ xj = load(x + j, n);
      return Ops::select(Ops::is_neg_inf(xj), zero, w * (V_::loadu(gb + j, n) - (xj - vmx - vmean) * vW - vem));
    });
  }
  if (ce_grad && y >= 0 && y < V) g[y] -= wc * (T(1) - P.eps);
}

template <typename scalar_t, typename acc_t>
void kd_loss_kernel(const KDParams<acc_t>& P, const at::Tensor& student, const at::Tensor& teacher, const Target& target,
                    const Temperature<acc_t>& temp, const Temperature<acc_t>& ttemp, at::Tensor& rows, at::Tensor& grad,
                    acc_t* pp) {
  const int64_t N = student.size(0), V = P.V, K = P.K;
  const scalar_t* xp = student.data_ptr<scalar_t>();
  const scalar_t* tp = teacher.data_ptr<scalar_t>();
  acc_t* rp = rows.data_ptr<acc_t>();
  scalar_t* gp = P.need_grad ? grad.data_ptr<scalar_t>() : nullptr;
  const int64_t sx = student.stride(0), st0 = teacher.stride(0), st1 = teacher.stride(1);
  const int64_t sg = P.need_grad ? grad.stride(0) : 0;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const int64_t nbuf = 3 + K;
  parallel_rows(N, grain(V, 1 + K), [&](const auto& blocks) {
    const bool cap = P.softcap > acc_t(0);  // the capped rows live in xbuf and tbuf
    std::vector<acc_t> work(nbuf * V), xbuf(same && !cap ? 0 : V), tbuf((same && !cap) || !P.has_kd ? 0 : K * V),
        gbuf(same ? 0 : V);
    std::vector<const acc_t*> trows(K);
    blocks([&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t y = target.present() ? target[i] : -1;
        if (target.present() && y == P.ignore_index) {
          ignore_row(i, N, rp, pp, P.need_grad ? gp + i * sg : nullptr, V);
          continue;
        }
        const acc_t* x = capped_row(xp + i * sx, V, P.softcap, xbuf.data());
        if (P.has_kd)
          for (int64_t k = 0; k < K; ++k) trows[k] = capped_row(tp + k * st0 + i * st1, V, P.softcap, tbuf.data() + k * V);
        acc_t* g = P.need_grad ? acc_out(gp + i * sg, gbuf.data()) : work.data();
        acc_t kd, ce;
        kd_row(P, x, trows.data(), y, temp.value(i), temp.inverse(i), ttemp.inverse(i), P.need_grad ? g : nullptr,
               work.data(), &kd, &ce);
        store_row_loss(i, N, rp, pp, P.alpha, kd, ce, P.scale);
        if (P.need_grad) {
          if (cap) soft_cap_row_grad(g, x, V, P.softcap);
          finish_out(g, gp + i * sg, V);
        }
      }
    });
  });
}

void kd_loss_fwd(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
                 const c10::optional<at::Tensor>& t, double t_value, const c10::optional<at::Tensor>& tt, double tt_value,
                 const c10::optional<at::Tensor>& scale_tensor, double scale, bool scale_grad, double alpha, double beta,
                 double skew, double ab_alpha, double ab_beta, double dkd_alpha, double dkd_beta, double softcap,
                 double label_smoothing, double norm_scale, int64_t ignore_index, int64_t divergence, int64_t norm,
                 bool temperature_squared, bool return_parts, at::Tensor rows, at::Tensor grad, at::Tensor parts) {
  check_rows(student, "student");
  TORCH_CHECK(teacher.dim() == 3 && teacher.size(0) >= 1 && teacher.size(1) == student.size(0) &&
                  teacher.size(2) == student.size(1) &&
                  (teacher.size(2) <= 1 || teacher.stride(2) == 1),
              "fastkd_cpu: teacher must be (K >= 1, N, V) with a unit column stride, got ", teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "fastkd_cpu: teacher must have the student's dtype");
  TORCH_CHECK(teacher.device().is_cpu(), "fastkd_cpu: teacher must be a CPU tensor");
  check_target(target, student.size(0));
  TORCH_CHECK(divergence >= FORWARD_KL && divergence <= DKD, "fastkd_cpu: divergence must be in [0, 7], got ", divergence);
  TORCH_CHECK(divergence != DKD || (target.has_value() && target->defined()), "fastkd_cpu: DKD needs a target");
  TORCH_CHECK(divergence != AB || ab_alpha > 0 || ab_beta > 0, "fastkd_cpu: ab_alpha and ab_beta must not both be 0");
  TORCH_CHECK(norm >= 0 && norm <= 2, "fastkd_cpu: norm must be 0, 1 or 2, got ", norm);
  const int64_t N = student.size(0), V = student.size(1);
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
  FASTKD_DISPATCH(student.scalar_type(), "fastkd_cpu::kd_loss_fwd", [&] {
    KDParams<acc_t> P;
    P.V = V;
    P.K = teacher.size(0);
    P.divergence = divergence;
    P.norm = norm;
    P.ignore_index = ignore_index;
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
    P.dkd_alpha = acc_t(dkd_alpha);
    P.dkd_beta = acc_t(dkd_beta);
    P.softcap = acc_t(softcap);
    P.eps = acc_t(label_smoothing);
    P.norm_scale = acc_t(norm_scale);
    P.scale = (scale_tensor.has_value() && scale_tensor->defined()) ? acc_t(scale_tensor->item<double>()) : acc_t(scale);
    Temperature<acc_t> temp(t, t_value, N), ttemp(tt, tt_value, N);
    kd_loss_kernel<scalar_t, acc_t>(P, student, teacher, Target(target), temp, ttemp, rows, grad,
                                    return_parts ? parts.data_ptr<acc_t>() : nullptr);
  });
}

// grad (N, V) *= grad_output (0-d, or (N,) one per row, any stride), in place; rows whose factor is 1 are
// not touched (nor is anything when a 0-d factor is 1).
void scale_grad_(at::Tensor grad, const at::Tensor& grad_output) {
  check_rows(grad, "grad");
  const int64_t N = grad.size(0), V = grad.size(1);
  TORCH_CHECK(grad_output.dim() == 0 || (grad_output.dim() == 1 && grad_output.size(0) == N),
              "fastkd_cpu: grad_output must be 0-d or (N,), got ", grad_output.sizes());
  if (grad.numel() == 0) return;
  FASTKD_DISPATCH(grad.scalar_type(), "fastkd_cpu::scale_grad_", [&] {
    at::Tensor go = grad_output.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gop = go.data_ptr<acc_t>();
    const bool one_value = grad_output.dim() == 0;
    if (one_value && gop[0] == acc_t(1)) return;
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const int64_t sg = grad.stride(0);
    parallel_rows(N, grain(V), [&](const auto& blocks) {
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : V);
      blocks([&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t f = one_value ? gop[0] : gop[i];
          if (f == acc_t(1)) continue;
          acc_t* row = acc_out(gp + i * sg, buf.data());
          const acc_t* src = as_acc(gp + i * sg, V, buf.data());
          const Vec<acc_t> vf(f);
          for_each_vec<acc_t>(V, [&](int64_t j, int64_t n) { store(Vec<acc_t>::loadu(src + j, n) * vf, row + j, n); });
          finish_out(row, gp + i * sg, V);
        }
      });
    });
  });
}

}  // namespace cpu
}  // namespace fastkd
