// The CUDA kernels' host interface: plain argument structs over raw pointers and the launchers that
// pick a kernel (kd_loss.cu, calibration.cu). No ATen type appears here, so the .cu files compile with
// nvcc and the CUDA headers alone (tests/test_cuda_compile.py); bindings.cpp checks the tensors, fills
// these structs and calls the launchers on the current stream under a device guard.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastkd {
namespace cuda {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// The dense loss over one teacher: row i of student (N, V) and teacher (N, V), unit column stride.
struct KDArgs {
  const void* student = nullptr;
  const void* teacher = nullptr;
  const void* target = nullptr;  // (N,) int32 or int64, contiguous; nullptr: no CE part
  void* grad = nullptr;          // (N, V) in the student's dtype, or nullptr (no gradient)
  float* rows = nullptr;         // (N,) float32: each row's loss times the scale
  float* parts = nullptr;        // (2, N) float32 (KD part, CE part) times the scale, or nullptr
  const float* t_row = nullptr;  // per-row student temperature (float32, stride t_stride), or nullptr
  const float* tt_row = nullptr;
  const float* scale_ptr = nullptr;  // 0-d float32 scale on the device, or nullptr (then ``scale``)
  int64_t N = 0, V = 0, sx = 0, st = 0, sg = 0, t_stride = 0, tt_stride = 0, ignore_index = -100;
  float t_value = 1.f, tt_value = 1.f, scale = 1.f, alpha = 0.5f, beta = 0.5f, eps = 0.f;
  float skew = 0.1f, ab_alpha = 1.f, ab_beta = 0.f;  // skew KL / skew reverse KL's w; the alpha-beta divergence's a, b
  // divergence: row_math.h's Divergence (forward KL, reverse KL, JSD, skew KL, skew reverse KL, TVD, alpha-beta)
  int dtype = BF16, divergence = 0;
  bool target_int32 = false, has_kd = true, has_ce = false, need_grad = false, scale_grad = true, t_squared = true;
};

// Which kernel runs a row: AUTO picks ONE_BLOCK for rows that fit one block, CLUSTER on sm_90+ for rows
// that fit a cluster of at most 16 blocks, else MULTI_PASS. The others force one (the GPU tests do, on
// small rows, to cover every path).
enum KDPath : int { AUTO = 0, ONE_BLOCK = 1, CLUSTER = 2, MULTI_PASS = 3 };

// The largest row (elements) one block holds: 16384 in every dtype (the raw row in shared memory,
// its exps in registers).
constexpr int64_t ONE_BLOCK_MAX = 16384;
constexpr int MAX_CLUSTER = 16;  // non-portable on H100/H200 (8 is the portable size)

// Launches the loss; returns nullptr, or a static message naming what failed.
const char* kd_loss_launch(const KDArgs& a, int path, cudaStream_t stream);
// The path AUTO resolves to for these arguments on the current device (for tests and benchmarks).
int kd_loss_path(const KDArgs& a, int path);

// The calibration pass's per-row values: nll, brier, confidence (1 / sum e^((x - max) / T)), ok (1 if
// the first index of the row's maximum is the target, 0 if not, -1 for an ignored row) and the
// confidence's bin among n_bins (row_math.h's confidence_bin). Sums are left to the caller (on device).
struct CalibrationArgs {
  const void* logits = nullptr;
  const void* target = nullptr;
  const float* t_row = nullptr;
  float* nll = nullptr;
  float* brier = nullptr;
  float* conf = nullptr;
  int8_t* ok = nullptr;
  int32_t* bin = nullptr;
  int64_t N = 0, C = 0, sx = 0, t_stride = 0, ignore_index = -100, n_bins = 15;
  float t_value = 1.f;
  int dtype = BF16;
  bool target_int32 = false;
};

const char* calibration_launch(const CalibrationArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastkd
