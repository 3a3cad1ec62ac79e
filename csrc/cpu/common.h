// What every CPU kernel file shares: the instruction set, vector helpers over at::vec, row buffers, the
// temperatures, and the dtype dispatch (float32 math for float16/bfloat16/float32, float64 for float64).
//
// SIMD: ATen's at::vec::Vectorized<T> picks its implementation from the CPU_CAPABILITY macros, which ATen
// sets per file when it builds each kernel once per instruction set and dispatches at run time. This
// extension is built for one instruction set, the compiler's: the JIT build passes -march=native (the
// machine that compiles is the one that runs) and the ahead-of-time build FASTKD_CPU_ARCH (native by
// default; x86-64-v3 or x86-64 for a wheel that moves), and the macros below follow what that enables.
// The loader (fastkd/_ext.py) refuses a build whose instruction set this CPU lacks. One build, not three,
// keeps the JIT compile short on a 2-core machine; a build for the baseline still vectorizes through
// Vectorized's generic code.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <fastkd/row_math.h>

#define FASTKD_STR2(x) #x
#define FASTKD_STR(x) FASTKD_STR2(x)
#define FASTKD_ISA FASTKD_STR(CPU_CAPABILITY)

namespace fastkd {
namespace cpu {

using at::vec::Vectorized;
template <typename T>
using Vec = Vectorized<T>;

// 1.5 2^23 + 127: adding it to a float w in [-2^22, 2^22] rounds w to the nearest integer n (ties to even)
// and leaves n + 127, the biased exponent of 2^n, in the sum's low bits (above them only bit 22, which a
// shift by 23 drops); subtracting it gives n as a float.
constexpr float ROUND_MAGIC = 12583039.0f;

// The float 2^n of t = n + ROUND_MAGIC, n an integer in [-127, 128]: t's low bits shifted into the exponent
// field (0 at n = -127, +inf at n = 128). One shift by an immediate (ATen's Vectorized shifts by a vector,
// which holds a register for the count).
C10_ALWAYS_INLINE Vec<float> exp2_int(Vec<float> t) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
#else
  return at::vec::cast<float>(at::vec::cast<int32_t>(t) << Vectorized<int32_t>(23));
#endif
}

// 2^n 2^f of float vectors, n an integer in [-127, 128] given as t = n + ROUND_MAGIC, f in about [-1/2, 1/2]:
// 2^f by a degree-6 polynomial 1 + f ln 2 + f^2 Q(f) (Q fitted for the relative error over [-1/2, 1/2]:
// 3.6e-9 in float64, so float32's rounding, 1.2e-7 evaluated, is all), times 2^n (exp2_int). n = -127 (where
// the true value is a denormal) makes the scale 0; n = 128 makes it +inf; a NaN f gives NaN. 9 vector
// instructions.
C10_ALWAYS_INLINE Vec<float> exp2_parts(Vec<float> t, Vec<float> f) {
  Vec<float> p(1.5252789782e-4f);
  p = at::vec::fmadd(p, f, Vec<float>(1.3390494742e-3f));
  p = at::vec::fmadd(p, f, Vec<float>(9.6187844028e-3f));
  p = at::vec::fmadd(p, f, Vec<float>(5.5503615083e-2f));
  p = at::vec::fmadd(p, f, Vec<float>(2.4022645271e-1f));
  p = at::vec::fmadd(p, f * f, at::vec::fmadd(f, Vec<float>(6.9314718056e-1f), Vec<float>(1.0f)));
  return p * exp2_int(t);
}

// 2^w for w <= 128 (or NaN), clamped below at -127 (NaN kept): 0 below -126.5 and at -inf. The kernels
// exponentiate with log2(e) folded into the row's scale, e^((x - m) k) = 2^((x - m) c), c = k log2(e): 13
// vector instructions for the exp, where vexp takes 16.
C10_ALWAYS_INLINE Vec<float> vexp2(Vec<float> w) {
  Vec<float> wc = at::vec::clamp_min(w, Vec<float>(-127.0f));  // keeps NaN
  Vec<float> t = wc + Vec<float>(ROUND_MAGIC);
  return exp2_parts(t, wc - (t - Vec<float>(ROUND_MAGIC)));
}

constexpr double LOG2E = 1.4426950408889634074;

// e^x of a float vector, x clamped to [-88, 88.72] (NaN kept): Cody-Waite reduction x = n ln 2 + r, |r| <=
// ln 2 / 2, with ln 2 in two parts (r exact where x log2(e), rounded, would lose |x| 2^-24), then 2^(r log2(e))
// as above: within 1.4e-7 relative of exp over [-87, -17] (measured), 0 below about -87.7 and at -inf, +inf from
// 88.38 (within 0.35 of float's overflow: the kernels exponentiate x - max x <= 0 and log-probabilities). 16
// vector instructions, against Sleef's exp_u10 (Vectorized::exp) at several times that.
C10_ALWAYS_INLINE Vec<float> vexp(Vec<float> x) {
  Vec<float> xc = at::vec::clamp(x, Vec<float>(-88.0f), Vec<float>(88.72f));
  Vec<float> t = at::vec::fmadd(xc, Vec<float>(float(LOG2E)), Vec<float>(ROUND_MAGIC));
  Vec<float> n = t - Vec<float>(ROUND_MAGIC);
  Vec<float> r = at::vec::fmadd(n, Vec<float>(-0.693359375f), xc);
  r = at::vec::fmadd(n, Vec<float>(2.12194440e-4f), r);
  return exp2_parts(t, r * Vec<float>(float(LOG2E)));
}

inline Vec<double> vexp2(Vec<double> w) { return w.exp2(); }
inline Vec<double> vexp(Vec<double> x) { return x.exp(); }

template <typename T>
inline Vec<T> vlog(Vec<T> x) {
  return x.log();
}

// The vector Ops policy of fastkd/row_math.h's element functions.
template <typename T>
struct VecOps {
  using V = Vec<T>;
  static V exp(V x) { return vexp(x); }
  static V log(V x) { return vlog(x); }
  static V max(V a, V b) { return at::vec::clamp_min(a, b); }
  static V is_zero(V x) { return x == V(T(0)); }
  static V less(V a, V b) { return a < b; }
  static V is_neg_inf(V x) { return x == V(-std::numeric_limits<T>::infinity()); }
  static V select(V mask, V if_true, V if_false) { return V::blendv(if_false, if_true, mask); }
};

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// n entries from p (n <= size), the rest -inf: a masked class, which every sum below already handles.
template <typename T>
inline Vec<T> load(const T* p, int64_t n) {
  if (n == Vec<T>::size()) return Vec<T>::loadu(p);
  return Vec<T>::set(Vec<T>(neg_inf<T>()), Vec<T>::loadu(p, n), n);
}

// n entries from p, the rest 0.
template <typename T>
inline Vec<T> load0(const T* p, int64_t n) {
  if (n == Vec<T>::size()) return Vec<T>::loadu(p);
  return Vec<T>::loadu(p, n);
}

template <typename T>
inline void store(Vec<T> v, T* p, int64_t n) {
  if (n == Vec<T>::size()) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

// f(j, n) for each vector of a row of V entries: n = Vec::size() but in the last one.
template <typename T, typename F>
inline void for_each_vec(int64_t V, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= V; j += W) f(j, W);
  if (j < V) f(j, V - j);
}

template <typename T>
inline T hsum(Vec<T> v) {
  alignas(64) T a[Vec<T>::size()];
  v.store(a);
  T s = T(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += a[i];
  return s;
}

// The S sums over a row of V entries that f(j, n, sums) adds into for each vector (for_each_vec's order),
// as scalars. The vector sums are locals here, held in registers: a lambda's accumulators captured by
// reference stay in memory, since every vector store is a may_alias store the compiler must assume writes
// them (a load and a store per sum and vector, on the loop's critical path).
template <typename T, int S, typename F>
C10_ALWAYS_INLINE std::array<T, S> row_sums(int64_t V, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  std::array<Vec<T>, S> sums;
  sums.fill(Vec<T>(T(0)));
  int64_t j = 0;
  for (; j + W <= V; j += W) f(j, W, sums);
  if (j < V) f(j, V - j, sums);
  std::array<T, S> out;
  for (int i = 0; i < S; ++i) out[i] = hsum(sums[i]);
  return out;
}

template <typename T>
inline T hmax(Vec<T> v) {
  alignas(64) T a[Vec<T>::size()];
  v.store(a);
  T m = a[0];
  for (int64_t i = 1; i < Vec<T>::size(); ++i) m = a[i] > m ? a[i] : m;
  return m;
}

// max over a row (a NaN entry is dropped here and reaches the results through the sums of exps).
template <typename T>
inline T row_max(const T* x, int64_t V) {
  Vec<T> m(neg_inf<T>());
  for_each_vec<T>(V, [&](int64_t j, int64_t n) { m = at::vec::clamp_min(m, load(x + j, n)); });
  return hmax(m);
}

// row_max of two rows of V entries, in one loop.
template <typename T>
inline std::array<T, 2> row_max2(const T* x, const T* y, int64_t V) {
  Vec<T> mx(neg_inf<T>()), my(neg_inf<T>());
  for_each_vec<T>(V, [&](int64_t j, int64_t n) {
    mx = at::vec::clamp_min(mx, load(x + j, n));
    my = at::vec::clamp_min(my, load(y + j, n));
  });
  return {hmax(mx), hmax(my)};
}

// The first index of the row's maximum, NaN counted as the maximum (torch.argmax's rule).
template <typename T>
inline int64_t row_argmax(const T* x, int64_t V) {
  int64_t best = 0;
  T m = x[0];
  if (m != m) return 0;
  for (int64_t j = 1; j < V; ++j) {
    T v = x[j];
    if (v != v) return j;
    if (v > m) {
      m = v;
      best = j;
    }
  }
  return best;
}

// The row x as acc_t: the row itself when the types agree, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* x, int64_t V, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    at::vec::convert(x, buf, V);
    return buf;
  }
}

// Where a row's acc_t result is formed: the output row itself when the types agree, else buf.
template <typename scalar_t, typename acc_t>
inline acc_t* acc_out(scalar_t* out, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return out;
  } else {
    return buf;
  }
}

// A row's loss alpha KD + (1 - alpha) CE and, when parts is not null ((2, N)), its KD and CE parts, each times
// the reduction's scale.
template <typename acc_t>
inline void store_row_loss(int64_t i, int64_t N, acc_t* rows, acc_t* parts, acc_t alpha, acc_t kd, acc_t ce, acc_t scale) {
  rows[i] = total_loss(alpha, kd, ce) * scale;
  if (parts) {
    parts[i] = kd * scale;
    parts[N + i] = ce * scale;
  }
}

// A row whose target is the ignore_index: loss 0, the KD and CE parts 0 (parts: (2, N) or null), gradient row 0
// (grad_row: null when no gradient is written).
template <typename acc_t, typename scalar_t>
inline void ignore_row(int64_t i, int64_t N, acc_t* rows, acc_t* parts, scalar_t* grad_row, int64_t V) {
  rows[i] = acc_t(0);
  if (parts) parts[i] = parts[N + i] = acc_t(0);
  if (grad_row) std::fill(grad_row, grad_row + V, scalar_t(0));
}

template <typename scalar_t, typename acc_t>
inline void finish_out(const acc_t* buf, scalar_t* out, int64_t V) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(buf, out, V);
}

// A temperature as the kernels read it: one value, or one per row; ``inverse`` is 1/T (NaN for a value
// that is not finite and > 0), ``value`` T itself (the KD weight's T^2).
template <typename T>
struct Temperature {
  at::Tensor holder;  // the per-row values converted to T, contiguous
  const T* data = nullptr;
  T scalar = T(1);

  Temperature(const c10::optional<at::Tensor>& tensor, double value, int64_t n_rows) {
    if (tensor.has_value() && tensor->defined()) {
      const at::Tensor& t = *tensor;
      TORCH_CHECK(t.dim() == 0 || (t.dim() == 1 && t.size(0) == n_rows),
                  "fastkd_cpu: temperature must be 0-d or hold one value per row (", n_rows, "), got shape ",
                  t.sizes());
      if (t.dim() == 0) {
        scalar = T(t.to(c10::CppTypeToScalarType<T>::value).template item<T>());
      } else {
        holder = t.to(c10::CppTypeToScalarType<T>::value).contiguous();
        data = holder.template data_ptr<T>();
      }
    } else {
      scalar = T(value);
    }
  }
  T value(int64_t row) const { return data ? data[row] : scalar; }
  T inverse(int64_t row) const { return inverse_temperature(value(row)); }
};

// CE's exps e^(x - max x) as powers of the student's e^(u_s), u_s = (x - max x) / T, when T is an integer
// in [1, 8] and there is no logit_norm: (e^(u_s))^T, a few multiplies instead of an exp per entry (a
// relative error of about T ulp; an entry below the smallest normal float flushes to 0, as vexp's). 0
// where CE needs its own exps.
template <typename T>
inline int ce_power(T temperature, int64_t norm) {
  const T p = std::round(temperature);
  return norm == NO_NORM && p == temperature && p >= T(1) && p <= T(8) ? int(p) : 0;
}

// e^P by squaring, P >= 1 known at compile time (with_power): a multiply per bit, nothing else.
template <int P, typename T>
C10_ALWAYS_INLINE Vec<T> vpow(Vec<T> e) {
  static_assert(P >= 1, "vpow: P >= 1");
  if constexpr (P == 1) {
    return e;
  } else if constexpr (P % 2 == 0) {
    return vpow<P / 2>(e * e);
  } else {
    return e * vpow<P / 2>(e * e);
  }
}

// f(std::integral_constant<int, p>{}) for ce_power's p in [0, 8]: the loops that raise to CE's power
// compiled once per power (at a power known only at run time, each vector would loop over its bits).
template <typename F>
inline void with_power(int p, const F& f) {
  switch (p) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});  // 0: CE has its own exps
  }
}

// The rows [0, n) over the threads of at::parallel_for, in blocks of ``grain`` rows that the threads take
// in turn from a shared counter: a thread that the OS deschedules (a machine shared with other work)
// holds up one block, where at::parallel_for's fixed split would leave its whole share waiting. body(blocks)
// runs once per thread (its row buffers set up there); blocks(f) calls f(begin, end) for each block the
// thread takes. Every kernel writes per-row results, so the order the blocks run in changes nothing.
template <typename Body>
inline void parallel_rows(int64_t n, int64_t grain, const Body& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) {
    body([&](const auto& f) { f(int64_t(0), n); });
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    body([&](const auto& f) {
      for (int64_t b = next.fetch_add(grain); b < n; b = next.fetch_add(grain)) f(b, std::min(b + grain, n));
    });
  });
}

// Rows per block of parallel_rows: about 32k entries, at least one row.
inline int64_t grain(int64_t V, int64_t per_entry = 1) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V * per_entry, 1));
}

inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "fastkd_cpu: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "fastkd_cpu: ", name, " must be (N, V), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fastkd_cpu: ", name, " must have a unit column stride, got ",
              x.strides());
}

inline void check_target(const c10::optional<at::Tensor>& target, int64_t n_rows) {
  if (!target.has_value() || !target->defined()) return;
  TORCH_CHECK(target->dim() == 1 && target->size(0) == n_rows, "fastkd_cpu: target must be (N,) = (", n_rows,
              ",), got ", target->sizes());
  TORCH_CHECK(target->scalar_type() == at::kLong || target->scalar_type() == at::kInt,
              "fastkd_cpu: target must be int64 or int32, got ", target->scalar_type());
  TORCH_CHECK(target->is_contiguous(), "fastkd_cpu: target must be contiguous");
}

// The target of row i as int64 (int32 or int64 targets).
struct Target {
  const int64_t* i64 = nullptr;
  const int32_t* i32 = nullptr;
  explicit Target(const c10::optional<at::Tensor>& t) {
    if (!t.has_value() || !t->defined()) return;
    if (t->scalar_type() == at::kLong) {
      i64 = t->data_ptr<int64_t>();
    } else {
      i32 = t->data_ptr<int32_t>();
    }
  }
  bool present() const { return i64 || i32; }
  int64_t operator[](int64_t i) const { return i64 ? i64[i] : int64_t(i32[i]); }
};

}  // namespace cpu
}  // namespace fastkd

// float16, bfloat16, float32, float64 inputs; scalar_t the input's type, acc_t its math type.
#define FASTKD_DISPATCH(TYPE, NAME, ...)                                                         \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] {                    \
    using acc_t = at::opmath_type<scalar_t>;                                                     \
    __VA_ARGS__();                                                                               \
  })

namespace fastkd {
namespace cpu {

// The first index of the value m in the row (m its max, found by row_max), or of its first NaN when the
// row holds one (``has_nan``): torch.argmax's answer, read a vector at a time until found.
template <typename T>
inline int64_t first_index_of_max(const T* x, int64_t V, T m, bool has_nan) {
  if (has_nan) return row_argmax(x, V);
  using V_ = Vec<T>;
  constexpr int64_t W = V_::size();
  const V_ vm(m);
  const int all = (1 << W) - 1;
  int64_t j = 0;
  for (; j + W <= V; j += W) {
    const int zeros = (V_::loadu(x + j) == vm).zero_mask();
    if (zeros != all) {
      for (int64_t l = 0; l < W; ++l) {
        if (!(zeros & (1 << l))) return j + l;
      }
    }
  }
  for (; j < V; ++j) {
    if (x[j] == m) return j;
  }
  return 0;
}

}  // namespace cpu
}  // namespace fastkd
