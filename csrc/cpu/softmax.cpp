// Tempered softmax and log-softmax over the rows of (N, V), forward and backward (kernels/softmax.py's
// module doc for the math). Exps per entry: forward 1 (softmax stores e^u in its output and scales it;
// log-softmax writes u - ln d); backward 0 (softmax from y), 1 (log-softmax from y, or from the logits
// when dL/dT is wanted: p recomputed from the saved row stats, kept in a row buffer between the pass that
// sums and the pass that writes).
#include "ops.h"

namespace fastkd {
namespace cpu {

template <typename scalar_t, typename acc_t>
void softmax_fwd_kernel(const at::Tensor& x, const Temperature<acc_t>& temp, bool log, at::Tensor& y,
                        at::Tensor& stats) {
  using V = Vec<acc_t>;
  const int64_t N = x.size(0), C = x.size(1);
  const bool store_stats = stats.size(0) == N && C > 0;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  float* sp = store_stats ? stats.data_ptr<float>() : nullptr;
  const int64_t sx = x.stride(0), sy = y.stride(0);
  parallel_rows(N, grain(C), [&](const auto& blocks) {
    std::vector<acc_t> in_buf(std::is_same_v<scalar_t, acc_t> ? 0 : C), out_buf(std::is_same_v<scalar_t, acc_t> ? 0 : C);
    blocks([&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* row = as_acc(xp + i * sx, C, in_buf.data());
        acc_t* out = acc_out(yp + i * sy, out_buf.data());
        const acc_t k = temp.inverse(i);
        acc_t m = row_max(row, C);
        if (store_stats && std::is_same_v<acc_t, double> && std::isfinite(float(m))) {
          m = acc_t(float(m));  // the shift the float32 stats record, so the backward's p is this one
        }
        const V vm(m), vk(k);
        const acc_t d = row_sums<acc_t, 1>(C, [&](int64_t j, int64_t n, auto& s) {
          V e = vexp((load(row + j, n) - vm) * vk);
          s[0] += e;
          if (!log) store(e, out + j, n);
        })[0];
        const acc_t ln_d = std::log(d);
        if (log) {
          const V vl(ln_d);
          for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) { store((load(row + j, n) - vm) * vk - vl, out + j, n); });
        } else {
          const V inv(acc_t(1) / d);
          for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) { store(V::loadu(out + j, n) * inv, out + j, n); });
        }
        finish_out(out, yp + i * sy, C);
        if (store_stats) {
          sp[2 * i] = float(m);
          sp[2 * i + 1] = float(ln_d);
        }
      }
    });
  });
}

void softmax_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& t, double t_value, bool log, at::Tensor y,
                 at::Tensor stats) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "fastkd_cpu: y must be x's shape and dtype");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(1) == 2 && stats.is_contiguous(),
              "fastkd_cpu: stats must be a contiguous (N, 2) or (0, 2) float32 tensor");
  if (x.numel() == 0) return;
  FASTKD_DISPATCH(x.scalar_type(), "fastkd_cpu::softmax_fwd", [&] {
    Temperature<acc_t> temp(t, t_value, x.size(0));
    softmax_fwd_kernel<scalar_t, acc_t>(x, temp, log, y, stats);
  });
}

// grad (N, V) = dL/dy in y's dtype gscalar_t; saved: y, or the logits x (with stats) when dt is wanted.
template <typename scalar_t, typename acc_t>
void softmax_bwd_kernel(const at::Tensor& grad, const at::Tensor& saved, const Temperature<acc_t>& temp,
                        const at::Tensor& stats, bool log, at::Tensor& dx, at::Tensor& dt, bool need_dx, bool need_dt) {
  using V = Vec<acc_t>;
  using Ops = VecOps<acc_t>;
  const int64_t N = saved.size(0), C = saved.size(1);
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const scalar_t* sp = saved.data_ptr<scalar_t>();
  scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
  float* dtp = need_dt ? dt.data_ptr<float>() : nullptr;
  const float* stp = need_dt ? stats.data_ptr<float>() : nullptr;
  const int64_t sg = grad.stride(0), ss = saved.stride(0), sdx = need_dx ? dx.stride(0) : 0;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  parallel_rows(N, grain(C), [&](const auto& blocks) {
    std::vector<acc_t> gbuf(same ? 0 : C), sbuf(same ? 0 : C), obuf(same ? 0 : C), pbuf(C);
    blocks([&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* g = as_acc(gp + i * sg, C, gbuf.data());
        const acc_t* s = as_acc(sp + i * ss, C, sbuf.data());
        acc_t* out = need_dx ? acc_out(dxp + i * sdx, obuf.data()) : nullptr;
        acc_t* p = pbuf.data();
        const acc_t k = temp.inverse(i);
        const V vk(k);
        if (!need_dt) {  // p from the output y
          const V vc(row_sums<acc_t, 1>(C, [&](int64_t j, int64_t n, auto& c) {
            V gj = load0(g + j, n);
            V pj = log ? vexp(load(s + j, n)) : load0(s + j, n);
            store(pj, p + j, n);
            c[0] += log ? gj : gj * pj;
          })[0]);
          for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) {
            store(softmax_grad(log, load0(g + j, n), V::loadu(p + j, n), vc) * vk, out + j, n);
          });
        } else {  // p = e^(u - ln d), u = (x - m) k, from the logits and the forward's (m, ln d)
          const V vm(static_cast<acc_t>(stp[2 * i])), vl(static_cast<acc_t>(stp[2 * i + 1]));
          const V vc(row_sums<acc_t, 1>(C, [&](int64_t j, int64_t n, auto& c) {
            V gj = load0(g + j, n);
            V pj = vexp((load(s + j, n) - vm) * vk - vl);
            store(pj, p + j, n);
            c[0] += log ? gj : gj * pj;
          })[0]);
          const acc_t udu = row_sums<acc_t, 1>(C, [&](int64_t j, int64_t n, auto& sum) {
            V xj = load(s + j, n);
            V du = softmax_grad(log, load0(g + j, n), V::loadu(p + j, n), vc);
            if (need_dx) store(du * vk, out + j, n);
            V u = (xj - vm) * vk;  // -inf entries (constants of T) and the padding lanes add nothing
            sum[0] += Ops::select(Ops::is_neg_inf(xj), V(acc_t(0)), u * du);
          })[0];
          const acc_t m = acc_t(stp[2 * i]);
          dtp[i] = m == neg_inf<acc_t>() ? NAN : float(-k * udu);  // all -inf: no distribution
        }
        if (need_dx) finish_out(out, dxp + i * sdx, C);
      }
    });
  });
}

void softmax_bwd(const at::Tensor& grad, const at::Tensor& saved, const c10::optional<at::Tensor>& t, double t_value,
                 const at::Tensor& stats, bool log, at::Tensor dx, at::Tensor dt, bool need_dx, bool need_dt) {
  check_rows(grad, "grad");
  check_rows(saved, "saved");
  TORCH_CHECK(grad.sizes() == saved.sizes() && grad.scalar_type() == saved.scalar_type(),
              "fastkd_cpu: grad must be saved's shape and dtype");
  const int64_t N = saved.size(0), C = saved.size(1);
  if (need_dx) {
    check_rows(dx, "dx");
    TORCH_CHECK(dx.sizes() == saved.sizes() && dx.scalar_type() == saved.scalar_type(), "fastkd_cpu: dx must be saved's shape and dtype");
  }
  if (need_dt) {
    TORCH_CHECK(dt.scalar_type() == at::kFloat && dt.dim() == 1 && dt.size(0) == N && dt.is_contiguous(),
                "fastkd_cpu: dt must be a contiguous (N,) float32 tensor");
    TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 2 &&
                    (stats.size(0) == N || C == 0) && stats.size(1) == 2,
                "fastkd_cpu: stats must be the forward's contiguous (N, 2) float32 row stats");
    if (C == 0) dt.zero_();
  }
  if (saved.numel() == 0) return;
  FASTKD_DISPATCH(saved.scalar_type(), "fastkd_cpu::softmax_bwd", [&] {
    Temperature<acc_t> temp(t, t_value, N);
    softmax_bwd_kernel<scalar_t, acc_t>(grad, saved, temp, stats, log, dx, dt, need_dx, need_dt);
  });
}

}  // namespace cpu
}  // namespace fastkd
