// Student-teacher fidelity (kernels/fidelity.py's module doc): per row, top-1 agreement and KL(p || q),
// p = mean_k softmax(t_k / T), q = softmax(s / T). A single teacher: a max pass and one pass of exps
// over both rows (2 exps per entry), KL = E / d_t - (ln d_t - ln d_s), E = sum_j e^(u_tj) (u_tj - u_sj),
// no buffer. An ensemble: each member's exps kept in a row buffer, then one pass forms p and its log
// (1 + K exps and 1 log per entry). Row values summed in float64 in row order.
#include "ops.h"

namespace fastkd {
namespace cpu {

template <typename scalar_t, typename acc_t>
void fidelity_kernel(const at::Tensor& student, const at::Tensor& teacher, const Temperature<acc_t>& temp, at::Tensor& agree,
                     at::Tensor& kl) {
  using V_ = Vec<acc_t>;
  using Ops = VecOps<acc_t>;
  const int64_t N = student.size(0), C = student.size(1), K = teacher.size(0);
  const scalar_t* sp = student.data_ptr<scalar_t>();
  const scalar_t* tp = teacher.data_ptr<scalar_t>();
  const int64_t ss = student.stride(0), st0 = teacher.stride(0), st1 = teacher.stride(1);
  std::vector<acc_t> rkl(N);
  std::vector<int8_t> ragree(N);
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  parallel_rows(N, grain(C, 1 + K), [&](const auto& blocks) {
    std::vector<acc_t> sbuf(same ? 0 : C), tbuf(same ? 0 : K * C), ebuf(K > 1 ? (K + 1) * C : 0);
    std::vector<const acc_t*> t(K);
    std::vector<acc_t> mt(K), inv_dt(K);
    const V_ zero(acc_t(0));
    blocks([&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* s = as_acc(sp + i * ss, C, sbuf.data());
        for (int64_t k = 0; k < K; ++k) t[k] = as_acc(tp + k * st0 + i * st1, C, tbuf.data() + k * C);
        const acc_t u = temp.inverse(i);
        const V_ vu(u);
        const auto maxes = row_max2(s, t[0], C);  // the student's and the first teacher's, in one read
        const acc_t ms = maxes[0];
        const V_ vms(ms);
        if (K == 1) {
          mt[0] = maxes[1];
          const V_ vmt(mt[0]);
          V_ ds(acc_t(0)), dt(acc_t(0)), e(acc_t(0));
          for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) {
            V_ us = (load(s + j, n) - vms) * vu, ut = (load(t[0] + j, n) - vmt) * vu;
            V_ es = vexp(us), et = vexp(ut);
            ds += es;
            dt += et;
            e += Ops::select(Ops::is_zero(et), zero, et * (ut - us));
          });
          const acc_t d_s = hsum(ds), d_t = hsum(dt);
          rkl[i] = hsum(e) / d_t - (std::log(d_t) - std::log(d_s));
          const bool nan_row = rkl[i] != rkl[i];
          ragree[i] = first_index_of_max(s, C, ms, nan_row) == first_index_of_max(t[0], C, mt[0], nan_row);
          continue;
        }
        acc_t* lp = ebuf.data() + K * C;
        V_ ds(acc_t(0));
        for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) { ds += vexp((load(s + j, n) - vms) * vu); });
        const acc_t ln_ds = std::log(hsum(ds));
        for (int64_t k = 0; k < K; ++k) {
          mt[k] = k == 0 ? maxes[1] : row_max(t[k], C);
          const V_ vmt(mt[k]);
          acc_t* ek = ebuf.data() + k * C;
          const acc_t* tk = t[k];
          const acc_t dt = row_sums<acc_t, 1>(C, [&](int64_t j, int64_t n, auto& sum) {
            V_ et = vexp((load(tk + j, n) - vmt) * vu);
            store(et, ek + j, n);
            sum[0] += et;
          })[0];
          inv_dt[k] = acc_t(1) / (dt * acc_t(K));
        }
        const V_ vln_ds(ln_ds);
        rkl[i] = row_sums<acc_t, 1>(C, [&](int64_t j, int64_t n, auto& total) {
          V_ p(acc_t(0));
          for (int64_t k = 0; k < K; ++k) p += V_::loadu(ebuf.data() + k * C + j, n) * V_(inv_dt[k]);
          V_ lpj = vlog(p);
          store(lpj, lp + j, n);
          total[0] += kl_term<Ops>(p, lpj, (load(s + j, n) - vms) * vu - vln_ds);
        })[0];
        const bool nan_row = rkl[i] != rkl[i];
        ragree[i] = first_index_of_max(s, C, ms, nan_row) == first_index_of_max(lp, C, row_max(lp, C), nan_row);
      }
    });
  });
  int64_t a = 0;
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    a += ragree[i];
    total += double(rkl[i]);
  }
  agree.fill_(a);
  kl.fill_(total);
}

void fidelity(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& t, double t_value,
              at::Tensor agree, at::Tensor kl) {
  check_rows(student, "student");
  TORCH_CHECK(teacher.dim() == 3 && teacher.size(0) >= 1 && teacher.size(1) == student.size(0) &&
                  teacher.size(2) == student.size(1) && (teacher.size(2) <= 1 || teacher.stride(2) == 1) &&
                  teacher.scalar_type() == student.scalar_type(),
              "fastkd_cpu: teacher must be (K >= 1, N, C) of the student's dtype with a unit column stride, got ",
              teacher.sizes());
  TORCH_CHECK(agree.scalar_type() == at::kLong && agree.dim() == 0 && kl.scalar_type() == at::kDouble && kl.dim() == 0,
              "fastkd_cpu: agree must be a 0-d int64 tensor and kl a 0-d float64 tensor");
  if (student.numel() == 0) {
    agree.zero_();
    kl.zero_();
    return;
  }
  FASTKD_DISPATCH(student.scalar_type(), "fastkd_cpu::fidelity", [&] {
    Temperature<acc_t> temp(t, t_value, student.size(0));
    fidelity_kernel<scalar_t, acc_t>(student, teacher, temp, agree, kl);
  });
}

}  // namespace cpu
}  // namespace fastkd
