// Fused fp32 CPU kernels for the memory-bound parts of a transformer layer, called through MindSpore's
// ops.Custom(func_type="aot"). Each MindSpore op they replace reads and writes the whole tensor once; these
// do one pass per row (the row stays in cache), threaded over rows with OpenMP.
//
// Calling convention of an aot kernel: params holds the inputs, then the outputs; shapes[i] / ndims[i]
// describe params[i]. Return 0 on success.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <vector>
#include <omp.h>

// glibc's libmvec has a vector tanhf; declaring it "simd" lets the GeLU loops use it without -ffast-math
// (whose finite-math assumption would let NaN and inf slip through the max and the sums).
extern "C" {
#pragma omp declare simd notinbranch
float tanhf(float);
}

namespace {

int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

constexpr float kSqrt2OverPi = 0.79788456f;  // Megatron's bias-GeLU constants
constexpr float kCubic = 0.044715f;
constexpr float kCubicSlope = 0.1070322243f;  // 3 * 0.044715 * sqrt(2 / pi)
constexpr float kMaskedScore = -10000.0f;     // Megatron's masked attention score
constexpr int64_t kParallelMin = 1 << 15;     // fewer elements than this: one thread (waking more costs more)

// exp(x) for the softmax, inlined so that it vectorizes: libmvec's expf leaves its vector path for every
// lane that underflows, and masked scores (-10000) fill half of a causal softmax. Cody-Waite reduction
// x = n ln2 + r and Cephes' degree-7 polynomial for exp(r) (about 1 ulp); results below FLT_MIN (x < -87)
// are flushed to zero. A NaN argument gives NaN.
__attribute__((always_inline)) inline float exp_or_zero(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.0f ? 0.0f : p * two_n;
}

// tanh(x); |x| > 10 is +-1 in fp32, and libmvec's tanhf is slow out there (NaN passes).
__attribute__((always_inline)) inline float tanh_clamped(float x) {
  return tanhf(x > 10.0f ? 10.0f : (x < -10.0f ? -10.0f : x));
}

// Row r of the scores [B, N, Sq, Sk] -> offset of its mask row in a mask [MB, MN, Sq, Sk], MB in {1, B},
// MN in {1, N} (the mask is broadcast over batch and heads, never copied).
struct MaskRows {
  int64_t heads, sq, sk, mask_batch, mask_heads;
  MaskRows(int64_t **shapes, int score_idx, int mask_idx) {
    const int64_t *s = shapes[score_idx], *m = shapes[mask_idx];
    heads = s[1]; sq = s[2]; sk = s[3]; mask_batch = m[0]; mask_heads = m[1];
  }
  int64_t offset(int64_t row) const {
    int64_t q = row % sq, n = (row / sq) % heads, b = row / (sq * heads);
    return (((mask_batch == 1 ? 0 : b) * mask_heads + (mask_heads == 1 ? 0 : n)) * sq + q) * sk;
  }
};

}  // namespace

extern "C" {

// y = x / 2 (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))
int GeluTanhForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = numel(ndims[0], shapes[0]);
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    y[i] = v * 0.5f * (1.0f + tanh_clamped(kSqrt2OverPi * v * (1.0f + kCubic * v * v)));
  }
  return 0;
}

// dx = dy * (x/2 (1 - t^2)(sqrt(2/pi) + 0.1070322243 x^2) + (1 + t)/2), t = the forward's tanh
int GeluTanhBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = numel(ndims[0], shapes[0]);
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i], v2 = v * v;
    const float t = tanh_clamped(kSqrt2OverPi * v * (1.0f + kCubic * v2));
    const float slope = 0.5f * v * ((1.0f - t * t) * (kSqrt2OverPi + kCubicSlope * v2)) + 0.5f * (1.0f + t);
    dx[i] = slope * dy[i];
  }
  return 0;
}

// probs = softmax(where(mask, -10000, scores * scale)) over the last axis.
// inputs: scores [B, N, Sq, Sk], mask (bool) [MB, MN, Sq, Sk], scale [1]; output: probs like scores.
int MaskedSoftmaxForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const bool *mask = static_cast<const bool *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *p = static_cast<float *>(params[3]);
  const MaskRows rows(shapes, 0, 1);
  const int64_t k = rows.sk, n_rows = shapes[0][0] * rows.heads * rows.sq;
#pragma omp parallel for schedule(static) if (n_rows * k >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float *xr = x + r * k;
    const bool *mr = mask + rows.offset(r);
    float *pr = p + r * k;
    float top = -INFINITY;  // a NaN in the row is not the max, but reaches every output through the sum
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < k; ++j) {
      pr[j] = mr[j] ? kMaskedScore : xr[j] * scale;
      top = pr[j] > top ? pr[j] : top;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < k; ++j) {
      pr[j] = exp_or_zero(pr[j] - top);
      total += pr[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) pr[j] = pr[j] / total;
  }
  return 0;
}

// dscores = where(mask, 0, scale * p * (dp - sum(dp * p))), row by row.
// inputs: probs, dprobs [B, N, Sq, Sk], mask [MB, MN, Sq, Sk], scale [1]; output: dscores.
int MaskedSoftmaxBackward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *p = static_cast<const float *>(params[0]);
  const float *dp = static_cast<const float *>(params[1]);
  const bool *mask = static_cast<const bool *>(params[2]);
  const float scale = *static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  const MaskRows rows(shapes, 0, 2);
  const int64_t k = rows.sk, n_rows = shapes[0][0] * rows.heads * rows.sq;
#pragma omp parallel for schedule(static) if (n_rows * k >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float *pr = p + r * k, *gr = dp + r * k;
    const bool *mr = mask + rows.offset(r);
    float *dr = dx + r * k;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < k; ++j) dot += gr[j] * pr[j];
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) dr[j] = mr[j] ? 0.0f : (gr[j] - dot) * pr[j] * scale;
  }
  return 0;
}

// Cross entropy of each row of logits [R, V] against its target (Megatron's label smoothing s: the loss is
// (1 - s') nll - s' mean_j log p_j with s' = s V / (V - 1), passed in as s'). A target outside [0, V) picks
// nothing. inputs: logits [R, V], target (int32) [R], smoothing [1];
// outputs: loss [R], max [R], sum_j exp(z_j - max) [R] (the last two for the backward).
int CrossEntropyForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *z = static_cast<const float *>(params[0]);
  const int32_t *target = static_cast<const int32_t *>(params[1]);
  const float smoothing = *static_cast<const float *>(params[2]);
  float *loss = static_cast<float *>(params[3]);
  float *max_out = static_cast<float *>(params[4]);
  float *sum_out = static_cast<float *>(params[5]);
  const int64_t n_rows = shapes[0][0], v = shapes[0][1];
#pragma omp parallel for schedule(static) if (n_rows * v >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float *zr = z + r * v;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < v; ++j) top = zr[j] > top ? zr[j] : top;
    float total = 0.0f, shifted_sum = 0.0f;
#pragma omp simd reduction(+ : total, shifted_sum)
    for (int64_t j = 0; j < v; ++j) {
      total += exp_or_zero(zr[j] - top);
      shifted_sum += zr[j] - top;
    }
    const float log_z = std::log(total);
    const int32_t t = target[r];
    const float picked = (t >= 0 && t < v) ? zr[t] - top : 0.0f;
    float value = log_z - picked;
    if (smoothing > 0.0f) {
      const float sum_log_probs = shifted_sum - static_cast<float>(v) * log_z;
      value = (1.0f - smoothing) * value - smoothing * sum_log_probs / static_cast<float>(v);
    }
    loss[r] = value;
    max_out[r] = top;
    sum_out[r] = total;
  }
  return 0;
}

// dlogits = (softmax(z) - (1 - s') onehot(target) - s' / V) * dloss, row by row.
// inputs: logits [R, V], target [R], max [R], sum [R], dloss [R], smoothing [1]; output: dlogits [R, V].
int CrossEntropyBackward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *z = static_cast<const float *>(params[0]);
  const int32_t *target = static_cast<const int32_t *>(params[1]);
  const float *top = static_cast<const float *>(params[2]);
  const float *total = static_cast<const float *>(params[3]);
  const float *dloss = static_cast<const float *>(params[4]);
  const float smoothing = *static_cast<const float *>(params[5]);
  float *dz = static_cast<float *>(params[6]);
  const int64_t n_rows = shapes[0][0], v = shapes[0][1];
  const float spread = smoothing / static_cast<float>(v);
#pragma omp parallel for schedule(static) if (n_rows * v >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float *zr = z + r * v;
    float *dr = dz + r * v;
    const float m = top[r], inv_sum = 1.0f / total[r], g = dloss[r];
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) dr[j] = (exp_or_zero(zr[j] - m) * inv_sum - spread) * g;
    const int32_t t = target[r];
    if (t >= 0 && t < v) dr[t] = (exp_or_zero(zr[t] - m) * inv_sum - (1.0f - smoothing) - spread) * g;
  }
  return 0;
}

// y [R, C] = x [R, C] + b [C] (a linear layer's bias)
int BiasAddForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t n_rows = shapes[0][0], c = shapes[0][1];
#pragma omp parallel for schedule(static) if (n_rows * c >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) y[r * c + j] = x[r * c + j] + b[j];
  }
  return 0;
}

// db [C] = sum over rows of dy [R, C]; each thread sums a block of rows, the blocks are added in thread
// order (the same bits for a given thread count).
int ColumnSum(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  float *db = static_cast<float *>(params[1]);
  const int64_t n_rows = shapes[0][0], c = shapes[0][1];
  const int threads = n_rows * c >= kParallelMin ? omp_get_max_threads() : 1;
  std::vector<float> partial(static_cast<size_t>(threads) * c, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    float *pt = partial.data() + static_cast<size_t>(t) * c;
    for (int64_t r = n_rows * t / used; r < n_rows * (t + 1) / used; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) pt[j] += dy[r * c + j];
    }
  }
  for (int64_t j = 0; j < c; ++j) db[j] = 0.0f;
  for (int t = 0; t < threads; ++t) {
    for (int64_t j = 0; j < c; ++j) db[j] += partial[static_cast<size_t>(t) * c + j];
  }
  return 0;
}

// LayerNorm over the rows of x [R, H]: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps).
// inputs: x [R, H], w [H], b [H], eps [1]; outputs: y [R, H], mean [R], rstd [R].
int LayerNormForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  float *mean_out = static_cast<float *>(params[5]);
  float *rstd_out = static_cast<float *>(params[6]);
  const int64_t n_rows = shapes[0][0], h = shapes[0][1];
#pragma omp parallel for schedule(static) if (n_rows * h >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float *xr = x + r * h;
    float *yr = y + r * h;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < h; ++j) sum += xr[j];
    const float mean = sum / static_cast<float>(h);
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < h; ++j) sq += (xr[j] - mean) * (xr[j] - mean);
    const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(h) + eps);
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
  return 0;
}

// With xhat = (x - mean) * rstd and g = dy * w: dx = rstd (g - mean_H(g) - xhat mean_H(g xhat)),
// dw = sum_R(dy xhat), db = sum_R(dy). Each thread sums its own rows; the partial sums are then added in
// thread order, so a given thread count always gives the same bits.
// inputs: dy [R, H], x [R, H], w [H], mean [R], rstd [R]; outputs: dx [R, H], dw [H], db [H].
int LayerNormBackward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float *mean = static_cast<const float *>(params[3]);
  const float *rstd = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dw = static_cast<float *>(params[6]);
  float *db = static_cast<float *>(params[7]);
  const int64_t n_rows = shapes[0][0], h = shapes[0][1];
  const int threads = n_rows * h >= kParallelMin ? omp_get_max_threads() : 1;
  std::vector<float> partial(static_cast<size_t>(threads) * 2 * h, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    float *pw = partial.data() + static_cast<size_t>(t) * 2 * h, *pb = pw + h;
    const int64_t begin = n_rows * t / used, end = n_rows * (t + 1) / used;
    for (int64_t r = begin; r < end; ++r) {
      const float *dyr = dy + r * h, *xr = x + r * h;
      float *dxr = dx + r * h;
      const float m = mean[r], s = rstd[r];
      float g_sum = 0.0f, gx_sum = 0.0f;
#pragma omp simd reduction(+ : g_sum, gx_sum)
      for (int64_t j = 0; j < h; ++j) {
        const float g = dyr[j] * w[j], xhat = (xr[j] - m) * s;
        g_sum += g;
        gx_sum += g * xhat;
        pw[j] += dyr[j] * xhat;
        pb[j] += dyr[j];
      }
      const float g_mean = g_sum / static_cast<float>(h), gx_mean = gx_sum / static_cast<float>(h);
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) {
        const float xhat = (xr[j] - m) * s;
        dxr[j] = (dyr[j] * w[j] - g_mean - xhat * gx_mean) * s;
      }
    }
  }
  for (int64_t j = 0; j < h; ++j) {
    dw[j] = 0.0f;
    db[j] = 0.0f;
  }
  for (int t = 0; t < threads; ++t) {
    const float *pw = partial.data() + static_cast<size_t>(t) * 2 * h, *pb = pw + h;
    for (int64_t j = 0; j < h; ++j) {
      dw[j] += pw[j];
      db[j] += pb[j];
    }
  }
  return 0;
}

}  // extern "C"

// ---- matrix products through the BLAS that numpy ships (OpenBLAS), which runs a linear layer's shapes
// faster than MindSpore 2.10's CPU MatMul. MINDTRON_BLAS is its path, set at build time.

namespace {

using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *,
                         int64_t, float, float *, int64_t);
using Sgemm32 = void (*)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

using SetThreads = void (*)(int);
using GetThreads = int (*)();

struct Blas {
  Sgemm64 sgemm64 = nullptr;  // ILP64 interface (numpy's wheels: cblas_sgemm64_)
  Sgemm32 sgemm32 = nullptr;
  SetThreads set_threads = nullptr;
  int threads = 1, current = 1;
  Blas() {
#ifdef MINDTRON_BLAS
    void *lib = dlopen(MINDTRON_BLAS, RTLD_NOW | RTLD_GLOBAL);
    if (lib != nullptr) {
      sgemm64 = reinterpret_cast<Sgemm64>(dlsym(lib, "cblas_sgemm64_"));
      if (sgemm64 == nullptr) sgemm32 = reinterpret_cast<Sgemm32>(dlsym(lib, "cblas_sgemm"));
      const bool ilp64 = sgemm64 != nullptr;
      set_threads = reinterpret_cast<SetThreads>(
          dlsym(lib, ilp64 ? "openblas_set_num_threads64_" : "openblas_set_num_threads"));
      auto get = reinterpret_cast<GetThreads>(
          dlsym(lib, ilp64 ? "openblas_get_num_threads64_" : "openblas_get_num_threads"));
      threads = current = get != nullptr ? get() : 1;
    }
#endif
  }
  // Small products run on one thread: waking OpenBLAS's other threads costs more than they save there
  // (a tiny model's step was 1.3x slower with them), and they keep spinning on the cores afterwards.
  void use_threads_for(int64_t macs) {
    const int wanted = macs < (int64_t{1} << 22) ? 1 : threads;
    if (set_threads != nullptr && wanted != current) {
      set_threads(wanted);
      current = wanted;
    }
  }
};

Blas &blas() {
  static Blas instance;
  return instance;
}

// c [m, n] = op(a) op(b), row-major, with op(a) [m, k] and op(b) [k, n].
int gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float *a, const float *b, float *c) {
  Blas &lib = blas();
  lib.use_threads_for(m * n * k);
  // (leading dimensions at least 1 as BLAS requires, also for an empty product)
  const int64_t lda = std::max<int64_t>(1, trans_a ? m : k), ldb = std::max<int64_t>(1, trans_b ? k : n);
  const int64_t ldc = std::max<int64_t>(1, n);
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  if (lib.sgemm64 != nullptr) {
    lib.sgemm64(kRowMajor, ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
  } else if (lib.sgemm32 != nullptr) {
    lib.sgemm32(kRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f, a,
                static_cast<int>(lda), b, static_cast<int>(ldb), 0.0f, c, static_cast<int>(ldc));
  } else {
    return 1;
  }
  return 0;
}

// c = op(a) op(b) for each matrix of a stack: a [..., a0, a1], b [..., b0, b1] with the same leading
// (batch) dimensions, c [..., m, n].
int batched_gemm(bool trans_a, bool trans_b, void **params, int *ndims, int64_t **shapes) {
  const int da = ndims[0], db = ndims[1];
  const int64_t a0 = shapes[0][da - 2], a1 = shapes[0][da - 1], b0 = shapes[1][db - 2], b1 = shapes[1][db - 1];
  const int64_t m = trans_a ? a1 : a0, k = trans_a ? a0 : a1, n = trans_b ? b0 : b1;
  int64_t batch = 1;
  for (int i = 0; i < da - 2; ++i) batch *= shapes[0][i];
  const float *a = static_cast<const float *>(params[0]), *b = static_cast<const float *>(params[1]);
  float *c = static_cast<float *>(params[2]);
  for (int64_t i = 0; i < batch; ++i) {
    if (gemm(trans_a, trans_b, m, n, k, a + i * a0 * a1, b + i * b0 * b1, c + i * m * n) != 0) return 1;
  }
  return 0;
}

}  // namespace

extern "C" {

// 1 when the BLAS loaded (the Python side checks before using the products below).
int BlasAvailable() { return blas().sgemm64 != nullptr || blas().sgemm32 != nullptr ? 1 : 0; }

// c = a b, a b^T and a^T b over the last two dimensions (a linear layer: y = x w^T, dx = dy w, dw = dy^T x).
int MatmulNN(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return batched_gemm(false, false, params, ndims, shapes);
}

int MatmulNT(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return batched_gemm(false, true, params, ndims, shapes);
}

int MatmulTN(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return batched_gemm(true, false, params, ndims, shapes);
}

}  // extern "C"
