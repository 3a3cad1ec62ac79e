// The dense distillation loss on CUDA: each row's loss and dL/dx in one kernel (kernels/kd_loss.py's
// module doc for the math; the per-entry math is csrc/include/fastkd/row_math.h, the functions the CPU
// kernels run and their tests test). Every divergence of row_math.h's divergence_term (forward KL, reverse
// KL, JSD, skew KL, skew reverse KL, TVD, alpha-beta) against one teacher, CE with label
// smoothing, student and teacher temperatures (one value or one per row), ignore_index, T^2, the
// reduction's scale (a float or a 0-d device tensor), the loss's parts. Math in float32.
//
// Three paths, by width (kd_loss_path):
//   one block    V <= 16384: the block copies the raw rows of student and teacher into shared memory
//                (16-byte loads, scalar head/tail when the row is not 16-byte aligned), keeps their
//                exps in registers (CHUNKS x VEC a thread), and reduces max, sum-exp and the row sums
//                over the block; the gradient is written over the student's shared row, then stored
//                with 16-byte stores. HBM traffic: 2 reads + 1 write per entry, the minimum.
//   cluster      16384 < V <= 16 x 16384 on sm_90+: a thread-block cluster of ceil(V / 16384) blocks,
//                each the one-block kernel over its slice; each reduction is the block's, then the
//                cluster's through distributed shared memory (every block reads the others' partials
//                after a cluster barrier). Same traffic, one read of the row.
//   multi-pass   anything else (wider rows, GPUs without clusters): one block per row loops over it
//                from global memory: pass A online max / sum-exp, pass B the divergence's sums and, for
//                forward KL or without a KD gradient, the gradient (G = sum g = -1 there); reverse KL
//                and the others need G = sum g before any entry's gradient: pass C writes it.
//
// Exps per entry (ex2.approx after a log2(e) prescale; K = 1 teacher):
//   one block / cluster   2 (e^(u_s), e^(u_t), kept in registers) + 2 for CE at a student T != 1
//                         (e^(x - max) in the sum pass and again in the gradient pass); JSD adds 1 log,
//                         skew KL / skew reverse KL 1 log + 1 exp, alpha-beta up to 4 exps (row_math.h).
//   multi-pass            4 (2 in pass A, 2 again in pass B) + 2 for CE at T != 1 (+2 in pass C for
//                         the divergences other than forward KL, with a gradient).
// What the kernels do not cover (logit_norm, ensembles of K > 1 teachers, DKD, softcap, float64)
// fastkd/backends/cuda.py runs on another backend.
#include <cfloat>

#include "common.cuh"

namespace fastkd {
namespace cuda {

struct RowScalars {
  float temperature, ks, kt;
};

__device__ __forceinline__ RowScalars row_scalars(const KDArgs& a, int64_t i) {
  const float ts = row_value(a.t_row, a.t_stride, a.t_value, i);
  const float tt = row_value(a.tt_row, a.tt_stride, a.tt_value, i);
  return RowScalars{ts, a.has_kd ? inverse_temperature(ts) : 1.f, inverse_temperature(tt)};
}

// An ignored row: loss and parts 0, gradient 0 (this block's slice of it).
template <typename T>
__device__ __forceinline__ void ignored_row(const KDArgs& a, int64_t i, T* g, int64_t n, bool writer) {
  if (writer) {
    a.rows[i] = 0.f;
    if (a.parts) a.parts[i] = a.parts[a.N + i] = 0.f;
  }
  if (g)
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) g[j] = from_f<T>(0.f);
}

// The row's loss from its sums, written once (rank 0, thread 0).
__device__ __forceinline__ void write_loss(const KDArgs& a, int64_t i, float temperature, float D, float mx, float x_y,
                                           float d1, float sum_x, bool y_ok, float scale) {
  const float kd = a.has_kd ? kd_weight(1.f, temperature, a.t_squared) * D : 0.f;
  float ce = 0.f;
  if (a.has_ce) ce = (y_ok ? 1.f : NAN) * cross_entropy(a.eps, a.V, mx, x_y, logf(d1), sum_x);
  a.rows[i] = total_loss(a.alpha, kd, ce) * scale;
  if (a.parts) {
    a.parts[i] = kd * scale;
    a.parts[a.N + i] = ce * scale;
  }
}

// The gradient's weights: w on the KD term's (g - q G), wc on CE's (s - eps/V) and -(1 - eps) at y.
struct GradWeights {
  float w, wc, off, at_y;
  bool kd, ce;
};

__device__ __forceinline__ GradWeights grad_weights(const KDArgs& a, float temperature, float ks, bool y_ok, float scale) {
  const float gscale = a.scale_grad ? scale : 1.f;
  GradWeights gw;
  gw.kd = a.has_kd && a.alpha > 0.f;
  gw.ce = a.has_ce && a.alpha < 1.f;
  gw.w = gw.kd ? kd_weight(a.alpha, temperature, a.t_squared) * ks * gscale : 0.f;
  gw.wc = gw.ce ? (y_ok ? 1.f : NAN) * (1.f - a.alpha) * gscale : 0.f;
  gw.off = a.eps / float(a.V);
  gw.at_y = gw.wc * (1.f - a.eps);
  return gw;
}

// ---- one block / cluster ------------------------------------------------------------------------------

template <typename T, int THREADS, int CHUNKS, bool CLUSTER>
__global__ void __launch_bounds__(THREADS) kd_rows_kernel(const KDArgs a, int64_t slice) {
  constexpr int VEC = Vec16<T>::N;
  constexpr int64_t CAP = int64_t(THREADS) * CHUNKS * VEC;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* ts = xs + CAP;
  __shared__ float scratch[32 * 3];
  __shared__ float red[3][3];  // one slot per reduction (a cluster's blocks read them remotely)

  const unsigned csize = cluster_blocks<CLUSTER>(), rank = cluster_rank<CLUSTER>();
  const int64_t i = blockIdx.x / csize, V = a.V;
  const int64_t lo = min(V, int64_t(rank) * slice), n = min(V, lo + slice) - lo;
  const T* xrow = static_cast<const T*>(a.student) + i * a.sx;
  const T* trow = static_cast<const T*>(a.teacher) + i * a.st;
  T* g = a.need_grad ? static_cast<T*>(a.grad) + i * a.sg + lo : nullptr;
  const bool writer = rank == 0 && threadIdx.x == 0;
  const int64_t y = a.target ? load_target(a.target, a.target_int32, i) : -1;
  if (a.target && y == a.ignore_index) return ignored_row(a, i, g, n, writer);  // the whole cluster returns
  const bool y_ok = y >= 0 && y < V;
  const float x_y = (writer && y_ok) ? to_f(xrow[y]) : 0.f;  // before any block writes the gradient (inplace)

  row_to_shared(xrow + lo, xs, n);
  if (a.has_kd) row_to_shared(trow + lo, ts, n);
  __syncthreads();

  // pass 1: max x, max t, sum x
  float r1[3] = {-INFINITY, -INFINITY, 0.f};
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t j0 = (int64_t(c) * THREADS + threadIdx.x) * VEC;
    if (j0 >= n) continue;
    const Vec16<T> vx = *reinterpret_cast<const Vec16<T>*>(xs + j0);
    const Vec16<T> vt = *reinterpret_cast<const Vec16<T>*>(ts + j0);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (j0 + e >= n) break;
      const float xv = to_f(vx.v[e]);
      r1[0] = fmaxf(r1[0], xv);
      r1[2] += xv;
      if (a.has_kd) r1[1] = fmaxf(r1[1], to_f(vt.v[e]));
    }
  }
  row_reduce<CLUSTER, 2>(r1, scratch, red[0]);
  const float mx = r1[0], mt = r1[1], sum_x = r1[2];

  // pass 2: the exps, kept in registers; their sums
  const RowScalars rs = row_scalars(a, i);
  const bool share = a.has_ce && rs.ks == 1.f;  // CE's exps are the student's
  const bool ce_exps = a.has_ce && !share;
  const float cs = rs.ks * LOG2E, ct = rs.kt * LOG2E;
  float es[CHUNKS][VEC], et[CHUNKS][VEC];
  float r2[3] = {0.f, 0.f, 0.f};
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t j0 = (int64_t(c) * THREADS + threadIdx.x) * VEC;
    Vec16<T> vx, vt;
    if (j0 < n) {
      vx = *reinterpret_cast<const Vec16<T>*>(xs + j0);
      vt = *reinterpret_cast<const Vec16<T>*>(ts + j0);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const bool valid = j0 + e < n;
      const float z = valid ? to_f(vx.v[e]) - mx : 0.f;
      es[c][e] = valid ? exp2_fast(z * cs) : 0.f;
      et[c][e] = (valid && a.has_kd) ? exp2_fast((to_f(vt.v[e]) - mt) * ct) : 0.f;
      r2[0] += es[c][e];
      r2[1] += et[c][e];
      if (ce_exps && valid) r2[2] += exp2_fast(z * LOG2E);
    }
  }
  row_reduce<CLUSTER, 0>(r2, scratch, red[1]);
  const float ds = r2[0], dt = r2[1], d1 = share ? ds : r2[2];

  // pass 3: the divergence's terms D_j and g_j; es becomes q, et becomes g
  float r3[3] = {0.f, 0.f, 0.f};
  if (a.has_kd) {
    const float inv_ds = 1.f / ds, inv_dt = 1.f / dt, ln_ds = logf(ds), ln_dt = logf(dt), c_off = ln_dt - ln_ds;
    const auto dc = divergence_constants<float, float>(a.divergence, a.beta, a.skew, a.ab_alpha, a.ab_beta, FLT_MIN);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t j0 = (int64_t(c) * THREADS + threadIdx.x) * VEC;
      Vec16<T> vx, vt;
      if (j0 < n) {
        vx = *reinterpret_cast<const Vec16<T>*>(xs + j0);
        vt = *reinterpret_cast<const Vec16<T>*>(ts + j0);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (j0 + e >= n) continue;
        const float us = (to_f(vx.v[e]) - mx) * rs.ks, ut = (to_f(vt.v[e]) - mt) * rs.kt;
        const float q = es[c][e] * inv_ds, p = et[c][e] * inv_dt;
        float d, gj;
        divergence_term<ScalarOps<float>>(dc, p, q, ut - ln_dt, us - ln_ds, (ut - us) - c_off, &d, &gj);
        r3[0] += d;
        r3[1] += gj;
        es[c][e] = q;
        et[c][e] = gj;
      }
    }
    row_reduce<CLUSTER, 0>(r3, scratch, red[2]);
  }
  const float D = r3[0], G = r3[1];
  const float scale = a.scale_ptr ? *a.scale_ptr : a.scale;
  if (writer) write_loss(a, i, rs.temperature, D, mx, x_y, d1, sum_x, y_ok, scale);

  // pass 4: the gradient, over the student's shared row, then stored
  if (a.need_grad) {
    const GradWeights gw = grad_weights(a, rs.temperature, rs.ks, y_ok, scale);
    const float inv_d1 = 1.f / d1;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t j0 = (int64_t(c) * THREADS + threadIdx.x) * VEC;
      if (j0 >= n) continue;
      Vec16<T> vx = *reinterpret_cast<const Vec16<T>*>(xs + j0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float gv = gw.kd ? gw.w * (et[c][e] - es[c][e] * G) : 0.f;
        if (gw.ce) {
          float s1;
          if (share)
            s1 = a.has_kd ? es[c][e] : es[c][e] * inv_d1;
          else
            s1 = exp2_fast((to_f(vx.v[e]) - mx) * LOG2E) * inv_d1;
          gv += gw.wc * (s1 - gw.off);
          if (lo + j0 + e == y) gv -= gw.at_y;
        }
        vx.v[e] = from_f<T>(gv);
      }
      *reinterpret_cast<Vec16<T>*>(xs + j0) = vx;
    }
    __syncthreads();
    shared_to_row(xs, g, n);
  }
  cluster_barrier<CLUSTER>();  // no block leaves while another may still read its red[] slots
}

// ---- multi-pass ---------------------------------------------------------------------------------------

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) kd_rows_multipass_kernel(const KDArgs a) {
  __shared__ float scratch[32 * 4];
  __shared__ float red[4];
  const int64_t i = blockIdx.x, V = a.V;
  const T* x = static_cast<const T*>(a.student) + i * a.sx;
  const T* t = a.has_kd ? static_cast<const T*>(a.teacher) + i * a.st : nullptr;
  T* g = a.need_grad ? static_cast<T*>(a.grad) + i * a.sg : nullptr;
  const bool writer = threadIdx.x == 0;
  const int64_t y = a.target ? load_target(a.target, a.target_int32, i) : -1;
  if (a.target && y == a.ignore_index) return ignored_row(a, i, g, V, writer);
  const bool y_ok = y >= 0 && y < V;
  const float x_y = (writer && y_ok) ? to_f(x[y]) : 0.f;
  const RowScalars rs = row_scalars(a, i);
  const bool share = a.has_ce && rs.ks == 1.f;
  const bool ce_exps = a.has_ce && !share;
  const float cs = rs.ks * LOG2E, ct = rs.kt * LOG2E;

  // pass A: online max and sum-exp per thread (an exp per entry and distribution, one more per new max)
  float ms = -INFINITY, mt = -INFINITY, ds = 0.f, dt = 0.f, d1 = 0.f, sx = 0.f;
  for_each_pair(x, t, V, [&](int64_t, float xv, float tv) {
    sx += xv;
    if (xv > ms) {
      if (ds != 0.f) ds *= exp2_fast((ms - xv) * cs);
      if (d1 != 0.f) d1 *= exp2_fast((ms - xv) * LOG2E);
      ms = xv;
    }
    if (ms != -INFINITY) {
      ds += exp2_fast((xv - ms) * cs);
      if (ce_exps) d1 += exp2_fast((xv - ms) * LOG2E);
    }
    if (t) {
      if (tv > mt) {
        if (dt != 0.f) dt *= exp2_fast((mt - tv) * ct);
        mt = tv;
      }
      if (mt != -INFINITY) dt += exp2_fast((tv - mt) * ct);
    }
  });
  float r1[2] = {ms, mt};
  block_reduce<2>(r1, scratch, red);
  const float mx = r1[0], mtt = r1[1];
  float r2[4] = {ds == 0.f ? 0.f : ds * exp2_fast((ms - mx) * cs), dt == 0.f ? 0.f : dt * exp2_fast((mt - mtt) * ct),
                 d1 == 0.f ? 0.f : d1 * exp2_fast((ms - mx) * LOG2E), sx};
  block_reduce<0>(r2, scratch, red);
  const float dss = r2[0], dts = r2[1], d1s = share ? r2[0] : r2[2], sum_x = r2[3];

  const float scale = a.scale_ptr ? *a.scale_ptr : a.scale;
  const GradWeights gw = grad_weights(a, rs.temperature, rs.ks, y_ok, scale);
  const float inv_ds = 1.f / dss, inv_dt = 1.f / dts, ln_ds = logf(dss), ln_dt = logf(dts), c_off = ln_dt - ln_ds;
  const float inv_d1 = 1.f / d1s;
  const auto dc = divergence_constants<float, float>(a.divergence, a.beta, a.skew, a.ab_alpha, a.ab_beta, FLT_MIN);
  // the gradient at entry j from q_j, g_j and G
  auto grad_at = [&](int64_t j, float xv, float q, float gj, float G) {
    float gv = gw.kd ? gw.w * (gj - q * G) : 0.f;
    if (gw.ce) {
      const float s1 = share ? q : exp2_fast((xv - mx) * LOG2E) * inv_d1;
      gv += gw.wc * (s1 - gw.off);
      if (j == y) gv -= gw.at_y;
    }
    g[j] = from_f<T>(gv);
  };
  auto terms = [&](float xv, float tv, float* q, float* d, float* gj) {
    const float us = (xv - mx) * rs.ks, ut = (tv - mtt) * rs.kt;
    *q = exp2_fast(us * LOG2E) * inv_ds;
    const float p = exp2_fast(ut * LOG2E) * inv_dt;
    divergence_term<ScalarOps<float>>(dc, p, *q, ut - ln_dt, us - ln_ds, (ut - us) - c_off, d, gj);
  };

  // pass B: D and G; the gradient too where G is known before the pass (forward KL: G = -sum p = -1)
  const bool fused = g && (!gw.kd || a.divergence == FORWARD_KL);
  float r3[2] = {0.f, 0.f};
  if (a.has_kd || fused) {
    for_each_pair(x, t, V, [&](int64_t j, float xv, float tv) {
      float q = 0.f, d = 0.f, gj = 0.f;
      if (a.has_kd) {
        terms(xv, tv, &q, &d, &gj);
        r3[0] += d;
        r3[1] += gj;
      } else {
        q = exp2_fast((xv - mx) * LOG2E) * inv_d1;  // no KD: the student's s at T = 1 (share)
      }
      if (fused) grad_at(j, xv, q, gj, -1.f);
    });
    block_reduce<0>(r3, scratch, red);
  }
  const float D = r3[0], G = r3[1];
  if (writer) write_loss(a, i, rs.temperature, D, mx, x_y, d1s, sum_x, y_ok, scale);

  // pass C: the gradient of the other divergences, which needs G
  if (g && !fused) {
    for_each_pair(x, t, V, [&](int64_t j, float xv, float tv) {
      float q, d, gj;
      terms(xv, tv, &q, &d, &gj);
      grad_at(j, xv, q, gj, G);
    });
  }
}

// ---- launch -------------------------------------------------------------------------------------------

namespace {

constexpr int MULTI_THREADS = 1024;

template <typename T>
constexpr int vec_of() {
  return Vec16<T>::N;
}

// The one-block configurations (THREADS, CHUNKS) by capacity, the smallest that holds the slice.
template <typename T>
struct Configs;
template <>
struct Configs<float> {
  static constexpr int n = 5;
  static constexpr int threads[n] = {128, 512, 512, 512, 512};
  static constexpr int chunks[n] = {1, 1, 2, 4, 8};
};
template <typename T>
struct Configs {  // half, bfloat16: 8 per vector
  static constexpr int n = 4;
  static constexpr int threads[n] = {128, 512, 512, 512};
  static constexpr int chunks[n] = {1, 1, 2, 4};
};

template <typename T, int THREADS, int CHUNKS, bool CLUSTER>
cudaError_t launch_rows(const KDArgs& a, int64_t slice, int csize, cudaStream_t stream) {
  auto kernel = kd_rows_kernel<T, THREADS, CHUNKS, CLUSTER>;
  const size_t smem = size_t(2) * THREADS * CHUNKS * vec_of<T>() * sizeof(T);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(a.N * csize));
  config.blockDim = dim3(THREADS);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  config.attrs = attr;
  config.numAttrs = 0;
  if (CLUSTER) {
    if (csize > 8) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
      if (err != cudaSuccess) return err;
    }
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(csize);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.numAttrs = 1;
    int clusters = 0;  // whether the GPU can place one such cluster at all (its blocks' shared memory)
    err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
    if (err != cudaSuccess) return err;
    if (clusters == 0) return cudaErrorInvalidClusterSize;
  }
  return cudaLaunchKernelEx(&config, kernel, a, slice);
}

// The largest configuration's capacity (16384 in every dtype).
template <typename T>
constexpr int64_t capacity(int k) {
  return int64_t(Configs<T>::threads[k]) * Configs<T>::chunks[k] * vec_of<T>();
}

template <typename T, int K = 0>
cudaError_t launch_one_block(const KDArgs& a, cudaStream_t stream) {
  if constexpr (K + 1 < Configs<T>::n) {
    if (a.V > capacity<T>(K)) return launch_one_block<T, K + 1>(a, stream);
  }
  return launch_rows<T, Configs<T>::threads[K], Configs<T>::chunks[K], false>(a, a.V, 1, stream);
}

bool device_has_clusters() {
  int device = 0, major = 0, launch = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&launch, cudaDevAttrClusterLaunch, device);
  return major >= 9 && launch;
}

// Blocks of a cluster for a row: ceil(V / 16384); forced on a narrow row, 4 blocks of whole vectors.
int cluster_size(int64_t V, int64_t cap, bool forced) {
  const int64_t c = (V + cap - 1) / cap;
  return int(forced ? (c < 4 ? 4 : c) : c);
}

template <typename T>
cudaError_t launch_cluster(const KDArgs& a, bool forced, cudaStream_t stream) {
  constexpr int K = Configs<T>::n - 1;
  const int64_t cap = capacity<T>(K), vec = vec_of<T>();
  const int csize = cluster_size(a.V, cap, forced);
  int64_t slice = (a.V + csize - 1) / csize;
  slice = (slice + vec - 1) / vec * vec;
  return launch_rows<T, Configs<T>::threads[K], Configs<T>::chunks[K], true>(a, slice, csize, stream);
}

template <typename T>
const char* launch_typed(const KDArgs& a, int path, bool forced, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (path == ONE_BLOCK) {
    err = launch_one_block<T>(a, stream);
  } else if (path == CLUSTER) {
    err = launch_cluster<T>(a, a.V <= ONE_BLOCK_MAX, stream);
    if (err != cudaSuccess && !forced) {  // a cluster this GPU cannot place (e.g. 16 blocks): the fallback
      cudaGetLastError();
      kd_rows_multipass_kernel<T, MULTI_THREADS><<<unsigned(a.N), MULTI_THREADS, 0, stream>>>(a);
      err = cudaGetLastError();
    }
  } else {
    kd_rows_multipass_kernel<T, MULTI_THREADS><<<unsigned(a.N), MULTI_THREADS, 0, stream>>>(a);
    err = cudaGetLastError();
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int kd_loss_path(const KDArgs& a, int path) {
  if (path != AUTO) return path;
  if (a.V <= ONE_BLOCK_MAX) return ONE_BLOCK;
  if (a.V <= ONE_BLOCK_MAX * MAX_CLUSTER && device_has_clusters()) return CLUSTER;
  return MULTI_PASS;
}

const char* kd_loss_launch(const KDArgs& a, int path, cudaStream_t stream) {
  if (a.N == 0) return nullptr;
  const bool forced = path != AUTO;
  path = kd_loss_path(a, path);
  if (path == ONE_BLOCK && a.V > ONE_BLOCK_MAX) return "fastkd_cuda: the one-block path holds rows of at most 16384";
  if (path == CLUSTER && (a.V > ONE_BLOCK_MAX * MAX_CLUSTER || !device_has_clusters()))
    return "fastkd_cuda: the cluster path needs sm_90+ and rows of at most 16 x 16384";
  switch (a.dtype) {
    case F32:
      return launch_typed<float>(a, path, forced, stream);
    case F16:
      return launch_typed<__half>(a, path, forced, stream);
    default:
      return launch_typed<__nv_bfloat16>(a, path, forced, stream);
  }
}

}  // namespace cuda
}  // namespace fastkd
