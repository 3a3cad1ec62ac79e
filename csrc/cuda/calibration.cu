// The calibration pass on CUDA (kernels/calibration.py's module doc): per row of logits at a temperature,
// its NLL, Brier score, confidence max_j p_j = 1 / sum_j e^((x_j - max x) / T), whether its first
// maximum is the target, and the confidence's bin (row_math.h's confidence_bin, the CPU kernels' exact
// comparison). One read of the row, one block per row, 16-byte loads with a scalar head/tail; each
// thread keeps an online (max, sum e, sum e^2, first arg max): one exp per entry (the Brier score's
// sum p^2 is the sum of the exps squared), one more per thread for each new maximum it meets.
// The sums over rows (float64) are left to the caller, on the device.
#include "common.cuh"

namespace fastkd {
namespace cuda {

// The arg max with NaN as the largest value and the first index among equals (torch.argmax's order).
__device__ __forceinline__ bool better(float v, int64_t j, float bv, int64_t bj) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || j < bj);
  return v > bv || (v == bv && j < bj);
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) calibration_kernel(const CalibrationArgs a) {
  __shared__ float scratch[32 * 2];
  __shared__ float red[2][2];
  __shared__ float arg_v[THREADS / 32];
  __shared__ int64_t arg_j[THREADS / 32];
  const int64_t i = blockIdx.x, C = a.C;
  const T* x = static_cast<const T*>(a.logits) + i * a.sx;
  const int64_t y = load_target(a.target, a.target_int32, i);
  if (y == a.ignore_index) {
    if (threadIdx.x == 0) {
      a.nll[i] = a.brier[i] = 0.f;
      a.conf[i] = NAN;
      a.ok[i] = -1;
      a.bin[i] = -1;
    }
    return;
  }
  const float u = inverse_temperature(row_value(a.t_row, a.t_stride, a.t_value, i));
  const float cu = u * LOG2E;
  float m = -INFINITY, d = 0.f, d2 = 0.f, bv = -INFINITY;
  int64_t bj = C;
  for_each_pair<T>(x, nullptr, C, [&](int64_t j, float xv, float) {
    if (better(xv, j, bv, bj)) {
      bv = xv;
      bj = j;
    }
    if (xv > m) {
      if (d != 0.f) {
        const float r = exp2_fast((m - xv) * cu);
        d *= r;
        d2 *= r * r;
      }
      m = xv;
    }
    if (m != -INFINITY) {
      const float e = exp2_fast((xv - m) * cu);
      d += e;
      d2 += e * e;
    }
  });
  // the arg max over the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oj = __shfl_xor_sync(0xffffffffu, bj, o);
    if (better(ov, oj, bv, bj)) {
      bv = ov;
      bj = oj;
    }
  }
  if (lane == 0) {
    arg_v[warp] = bv;
    arg_j[warp] = bj;
  }
  float r1[1] = {m};
  block_reduce<1>(r1, scratch, red[0]);  // its barriers publish arg_v / arg_j too
  const float mx = r1[0];
  float r2[2] = {d == 0.f ? 0.f : d * exp2_fast((m - mx) * cu), 0.f};
  r2[1] = d2 == 0.f ? 0.f : d2 * exp2_fast(2.f * (m - mx) * cu);
  block_reduce<0>(r2, scratch, red[1]);
  if (threadIdx.x == 0) {
    for (int w = 1; w < THREADS / 32; ++w) {
      if (better(arg_v[w], arg_j[w], arg_v[0], arg_j[0])) {
        arg_v[0] = arg_v[w];
        arg_j[0] = arg_j[w];
      }
    }
    const float ds = r2[0], d2s = r2[1];
    const bool y_ok = y >= 0 && y < C;
    const float z_y = y_ok ? (to_f(x[y]) - mx) * u : NAN;
    const float p_y = exp2_fast(z_y * LOG2E) / ds;
    const float conf = 1.f / ds;
    a.nll[i] = logf(ds) - z_y;
    a.brier[i] = d2s / (ds * ds) - 2.f * p_y + 1.f;
    a.conf[i] = conf;
    a.ok[i] = arg_j[0] == y ? 1 : 0;
    a.bin[i] = int32_t(confidence_bin(conf, a.n_bins));
  }
}

const char* calibration_launch(const CalibrationArgs& a, cudaStream_t stream) {
  if (a.N == 0) return nullptr;
  constexpr int THREADS = 256;
  const unsigned grid = unsigned(a.N);
  switch (a.dtype) {
    case F32:
      calibration_kernel<float, THREADS><<<grid, THREADS, 0, stream>>>(a);
      break;
    case F16:
      calibration_kernel<__half, THREADS><<<grid, THREADS, 0, stream>>>(a);
      break;
    default:
      calibration_kernel<__nv_bfloat16, THREADS><<<grid, THREADS, 0, stream>>>(a);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace fastkd
