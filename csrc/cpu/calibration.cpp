// Calibration statistics and the temperature fit's Newton derivatives (kernels/calibration.py's module
// doc): per row, in acc_t, a max pass and one pass of exps over the logits (one exp per entry, base 2 with
// log2(e) folded into 1/T: common.h's vexp2; the Brier score's sum of p^2 is the sum of the exps
// squared), or no exp for probabilities at T = 1. The rows' values are kept (N of each, no N x C) and
// summed in float64 in row order afterwards: the same result on every run and for every thread count.
#include "ops.h"

namespace fastkd {
namespace cpu {

template <typename scalar_t, typename acc_t>
void calibration_kernel(const at::Tensor& logits, const Target& target, int64_t mode, const Temperature<acc_t>& temp,
                        bool probs, bool log_input, int64_t ignore_index, int64_t n_bins, at::Tensor& sums,
                        at::Tensor& bin_count, at::Tensor& bin_correct, at::Tensor& bin_conf, at::Tensor& confidence,
                        at::Tensor& correct) {
  using V_ = Vec<acc_t>;
  using Ops = VecOps<acc_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  const scalar_t* xp = logits.data_ptr<scalar_t>();
  const int64_t sx = logits.stride(0);
  // per row: a (NLL), b (Brier or NLL'), c (confidence or NLL''), ok (correct: 0/1; -1 ignored)
  std::vector<acc_t> ra(N), rb(N), rc(N);
  std::vector<int8_t> rok(N);
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  parallel_rows(N, grain(C), [&](const auto& blocks) {
    std::vector<acc_t> xbuf(same && !log_input ? 0 : C), lbuf(log_input ? C : 0), ebuf(mode == NEWTON ? C : 0);
    const V_ zero(acc_t(0));
    blocks([&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t y = target[i];
        if (y == ignore_index) {
          rok[i] = -1;
          continue;
        }
        const acc_t* raw = as_acc(xp + i * sx, C, xbuf.data());
        const acc_t* x = raw;
        if (log_input) {  // probabilities read as logits log p
          for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) { store(vlog(load0(raw + j, n)), lbuf.data() + j, n); });
          x = lbuf.data();
        }
        const bool y_ok = y >= 0 && y < C;
        const acc_t m = row_max(x, C);
        if (mode == NEWTON) {
          const acc_t u = temp.inverse(i);
          const V_ vm(m), vc(u * acc_t(LOG2E));
          acc_t* e = ebuf.data();
          const auto sums = row_sums<acc_t, 2>(C, [&](int64_t j, int64_t n, auto& s) {  // d, sum e (x - m)
            V_ xs = load(x + j, n) - vm;
            V_ ej = vexp2(xs * vc);
            store(ej, e + j, n);
            s[0] += ej;
            s[1] += Ops::select(Ops::is_zero(ej), zero, ej * xs);
          });
          const acc_t d = sums[0], mean = sums[1] / d;
          const V_ vmean(mean);
          V_ s2(acc_t(0));
          for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) {
            V_ ej = V_::loadu(e + j, n);
            V_ dev = load(x + j, n) - vm - vmean;
            s2 += Ops::select(Ops::is_zero(ej), zero, ej * dev * dev);
          });
          const acc_t xs_y = y_ok ? x[y] - m : nan_of<acc_t>();
          ra[i] = std::log(d) - xs_y * u;
          rb[i] = mean - xs_y;
          rc[i] = hsum(s2) / d;
          rok[i] = 0;
          continue;
        }
        if (probs) {  // the rows are p at T = 1
          V_ sq(acc_t(0));
          for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) {
            V_ p = load0(x + j, n);
            sq += p * p;
          });
          const acc_t s2 = hsum(sq);
          const acc_t p_y = y_ok ? x[y] : nan_of<acc_t>();
          ra[i] = -std::log(p_y);
          rb[i] = s2 - 2 * p_y + 1;
          rc[i] = s2 != s2 ? nan_of<acc_t>() : m;
          rok[i] = first_index_of_max(raw, C, row_max(raw, C), s2 != s2) == y;
          continue;
        }
        const acc_t u = temp.inverse(i);
        const V_ vm(m), vc(u * acc_t(LOG2E));
        V_ dsum(acc_t(0)), d2sum(acc_t(0));
        for_each_vec<acc_t>(C, [&](int64_t j, int64_t n) {
          V_ ej = vexp2((load(x + j, n) - vm) * vc);
          dsum += ej;
          d2sum += ej * ej;
        });
        const acc_t d = hsum(dsum), d2 = hsum(d2sum);
        const acc_t z_y = y_ok ? (x[y] - m) * u : nan_of<acc_t>();
        const acc_t p_y = std::exp(z_y) / d;
        ra[i] = std::log(d) - z_y;
        rb[i] = d2 / (d * d) - 2 * p_y + 1;
        rc[i] = acc_t(1) / d;
        rok[i] = first_index_of_max(raw, C, log_input ? row_max(raw, C) : m, d != d) == y;
      }
    });
  });
  // float64 sums in row order
  double* s = sums.data_ptr<double>();
  s[0] = s[1] = s[2] = 0.0;
  int64_t* bc = mode == BINS ? bin_count.data_ptr<int64_t>() : nullptr;
  int64_t* bk = mode == BINS ? bin_correct.data_ptr<int64_t>() : nullptr;
  double* bs = mode == BINS ? bin_conf.data_ptr<double>() : nullptr;
  float* cp = mode == ROWS ? confidence.data_ptr<float>() : nullptr;
  int8_t* kp = mode == ROWS ? correct.data_ptr<int8_t>() : nullptr;
  for (int64_t i = 0; i < N; ++i) {
    if (mode == ROWS) {
      cp[i] = rok[i] < 0 ? NAN : float(rc[i]);
      kp[i] = rok[i];
    }
    if (rok[i] < 0) continue;
    s[0] += double(ra[i]);
    s[1] += double(rb[i]);
    if (mode == NEWTON) {
      s[2] += double(rc[i]);
    } else if (mode == BINS) {
      const int64_t b = confidence_bin(rc[i], n_bins);
      bc[b] += 1;
      bk[b] += rok[i];
      bs[b] += double(rc[i]);
    }
  }
}

void calibration(const at::Tensor& logits, const at::Tensor& target, int64_t mode, const c10::optional<at::Tensor>& t,
                 double t_value, bool probs, bool log_input, int64_t ignore_index, int64_t n_bins, at::Tensor sums,
                 at::Tensor bin_count, at::Tensor bin_correct, at::Tensor bin_conf, at::Tensor confidence,
                 at::Tensor correct) {
  check_rows(logits, "logits");
  const int64_t N = logits.size(0);
  check_target(target, N);
  TORCH_CHECK(mode >= 0 && mode <= 2, "fastkd_cpu: mode must be 0 (bins), 1 (rows) or 2 (newton), got ", mode);
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.numel() == 3 && sums.is_contiguous(),
              "fastkd_cpu: sums must be a contiguous (3,) float64 tensor");
  if (mode == BINS) {
    TORCH_CHECK(n_bins >= 1, "fastkd_cpu: n_bins must be >= 1, got ", n_bins);
    TORCH_CHECK(bin_count.scalar_type() == at::kLong && bin_count.numel() == n_bins && bin_count.is_contiguous() &&
                    bin_correct.scalar_type() == at::kLong && bin_correct.numel() == n_bins && bin_correct.is_contiguous() &&
                    bin_conf.scalar_type() == at::kDouble && bin_conf.numel() == n_bins && bin_conf.is_contiguous(),
                "fastkd_cpu: bin_count, bin_correct (int64) and bin_conf (float64) must be contiguous (n_bins,) tensors");
    bin_count.zero_();
    bin_correct.zero_();
    bin_conf.zero_();
  }
  if (mode == ROWS) {
    TORCH_CHECK(confidence.scalar_type() == at::kFloat && confidence.numel() == N && confidence.is_contiguous() &&
                    correct.scalar_type() == at::kChar && correct.numel() == N && correct.is_contiguous(),
                "fastkd_cpu: confidence (float32) and correct (int8) must be contiguous (N,) tensors");
  }
  if (N == 0 || logits.size(1) == 0) {
    sums.zero_();
    if (mode == ROWS) {
      confidence.fill_(NAN);
      correct.fill_(-1);
    }
    return;
  }
  FASTKD_DISPATCH(logits.scalar_type(), "fastkd_cpu::calibration", [&] {
    Temperature<acc_t> temp(t, t_value, N);
    calibration_kernel<scalar_t, acc_t>(logits, Target(target), mode, temp, probs, log_input, ignore_index, n_bins, sums,
                                        bin_count, bin_correct, bin_conf, confidence, correct);
  });
}

}  // namespace cpu
}  // namespace fastkd
