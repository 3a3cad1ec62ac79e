// Device helpers shared by the CUDA kernels: element loads in float32, 16-byte vectorized row loops with
// a scalar head and tail for rows not 16-byte aligned, block reductions, and the cluster reduction that
// combines the blocks' partials through distributed shared memory (sm_90+).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>

#include <cstdint>

#include "fastkd/row_math.h"
#include "launch.h"

namespace fastkd {
namespace cuda {

constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// e^(z) as one ex2.approx (MUFU) after the log2(e) prescale the callers fold into their factor.
__device__ __forceinline__ float exp2_fast(float z) { return exp2f(z); }

// One 16-byte vector of T.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

__device__ __forceinline__ int64_t load_target(const void* target, bool int32, int64_t i) {
  return int32 ? int64_t(static_cast<const int32_t*>(target)[i]) : static_cast<const int64_t*>(target)[i];
}

__device__ __forceinline__ float row_value(const float* p, int64_t stride, float value, int64_t i) {
  return p ? p[i * stride] : value;
}

// f(j, a_j, b_j) for every j < n of rows a and b (b may be null: b_j = 0), the block's threads striding.
// Where a and b share their offset within 16 bytes, the body runs on 16-byte vectors (VEC elements a
// load) after a scalar head up to the first aligned address; the last partial vector is a scalar tail.
// Otherwise every element is loaded alone (still coalesced across the warp).
template <typename T, typename F>
__device__ __forceinline__ void for_each_pair(const T* a, const T* b, int64_t n, F f) {
  constexpr int VEC = Vec16<T>::N;
  const uintptr_t oa = reinterpret_cast<uintptr_t>(a) % 16;
  const uintptr_t ob = b ? reinterpret_cast<uintptr_t>(b) % 16 : oa;
  int64_t head = n;
  if (oa == ob && oa % sizeof(T) == 0) head = min(n, int64_t(((16 - oa) % 16) / sizeof(T)));
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) f(j, to_f(a[j]), b ? to_f(b[j]) : 0.f);
  const int64_t n_vec = (n - head) / VEC;
  const Vec16<T>* av = reinterpret_cast<const Vec16<T>*>(a + head);
  const Vec16<T>* bv = reinterpret_cast<const Vec16<T>*>(b ? b + head : a + head);
  for (int64_t v = threadIdx.x; v < n_vec; v += blockDim.x) {
    const Vec16<T> va = av[v];
    Vec16<T> vb;
    if (b) vb = bv[v];
#pragma unroll
    for (int e = 0; e < VEC; ++e) f(head + v * VEC + e, to_f(va.v[e]), b ? to_f(vb.v[e]) : 0.f);
  }
  for (int64_t j = head + n_vec * VEC + threadIdx.x; j < n; j += blockDim.x) f(j, to_f(a[j]), b ? to_f(b[j]) : 0.f);
}

// Copies n elements of a global row into shared memory (16-byte loads where aligned, as above).
template <typename T>
__device__ __forceinline__ void row_to_shared(const T* src, T* dst, int64_t n) {
  constexpr int VEC = Vec16<T>::N;
  const uintptr_t off = reinterpret_cast<uintptr_t>(src) % 16;
  int64_t head = (off % sizeof(T) == 0) ? min(n, int64_t(((16 - off) % 16) / sizeof(T))) : n;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) dst[j] = src[j];
  const int64_t n_vec = (n - head) / VEC;
  const Vec16<T>* sv = reinterpret_cast<const Vec16<T>*>(src + head);
  for (int64_t v = threadIdx.x; v < n_vec; v += blockDim.x) {
    const Vec16<T> x = sv[v];
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[head + v * VEC + e] = x.v[e];
  }
  for (int64_t j = head + n_vec * VEC + threadIdx.x; j < n; j += blockDim.x) dst[j] = src[j];
}

// Copies n elements from shared memory to a global row (16-byte stores where the destination is aligned).
template <typename T>
__device__ __forceinline__ void shared_to_row(const T* src, T* dst, int64_t n) {
  constexpr int VEC = Vec16<T>::N;
  const uintptr_t off = reinterpret_cast<uintptr_t>(dst) % 16;
  int64_t head = (off % sizeof(T) == 0) ? min(n, int64_t(((16 - off) % 16) / sizeof(T))) : n;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) dst[j] = src[j];
  const int64_t n_vec = (n - head) / VEC;
  Vec16<T>* dv = reinterpret_cast<Vec16<T>*>(dst + head);
  for (int64_t v = threadIdx.x; v < n_vec; v += blockDim.x) {
    Vec16<T> x;
#pragma unroll
    for (int e = 0; e < VEC; ++e) x.v[e] = src[head + v * VEC + e];
    dv[v] = x;
  }
  for (int64_t j = head + n_vec * VEC + threadIdx.x; j < n; j += blockDim.x) dst[j] = src[j];
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// NV values reduced over the block, the first NMAX by max and the others by sum, into out[NV] (shared);
// every thread returns with v holding the block's values. scratch: shared float[32 * NV].
// A max that sees NaN may drop it (as the CPU kernels' maxima); the sums carry it.
template <int NMAX, int NV>
__device__ __forceinline__ void block_reduce(float (&v)[NV], float* scratch, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = k < NMAX ? warp_max(v[k]) : warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) scratch[warp * NV + k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      float x = lane < n_warps ? scratch[lane * NV + k] : (k < NMAX ? -INFINITY : 0.f);
      x = k < NMAX ? warp_max(x) : warp_sum(x);
      if (lane == 0) out[k] = x;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = out[k];
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FASTKD_CLUSTERS 1
#endif

// The block reduction, then (CLUSTER) the cluster's: each block's out[] is read by every block of the
// cluster through distributed shared memory after a cluster barrier. ``out`` must be a slot no later
// reduction of the kernel reuses (a block may still be reading it), and the kernel ends with a cluster
// barrier so that no block exits while another reads its shared memory.
template <bool CLUSTER, int NMAX, int NV>
__device__ __forceinline__ void row_reduce(float (&v)[NV], float* scratch, float* out) {
  block_reduce<NMAX>(v, scratch, out);
  if constexpr (CLUSTER) {
#ifdef FASTKD_CLUSTERS
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const unsigned n = cluster.num_blocks();
#pragma unroll
    for (int k = 0; k < NV; ++k) v[k] = k < NMAX ? -INFINITY : 0.f;
    for (unsigned r = 0; r < n; ++r) {
      const float* remote = cluster.map_shared_rank(out, r);
#pragma unroll
      for (int k = 0; k < NV; ++k) v[k] = k < NMAX ? fmaxf(v[k], remote[k]) : v[k] + remote[k];
    }
#endif
  }
}

template <bool CLUSTER>
__device__ __forceinline__ void cluster_barrier() {
  if constexpr (CLUSTER) {
#ifdef FASTKD_CLUSTERS
    cooperative_groups::this_cluster().sync();
#endif
  }
}

template <bool CLUSTER>
__device__ __forceinline__ unsigned cluster_rank() {
  if constexpr (CLUSTER) {
#ifdef FASTKD_CLUSTERS
    return cooperative_groups::this_cluster().block_rank();
#endif
  }
  return 0;
}

template <bool CLUSTER>
__device__ __forceinline__ unsigned cluster_blocks() {
  if constexpr (CLUSTER) {
#ifdef FASTKD_CLUSTERS
    return cooperative_groups::this_cluster().num_blocks();
#endif
  }
  return 1;
}

}  // namespace cuda
}  // namespace fastkd
