// Fused fp32 CPU kernels for the memory-bound parts of a transformer layer, called through MindSpore's
// ops.Custom(func_type="aot"). Each MindSpore op they replace reads and writes the whole tensor once; these
// do one pass per row (the row stays in cache), threaded over rows with OpenMP.
//
// Calling convention of an aot kernel: params holds the inputs, then the outputs; shapes[i] / ndims[i]
// describe params[i]. Return 0 on success.
#include <algorithm>
#include <atomic>
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

// Rows of x [..., last]: the product of all its dimensions but the last.
int64_t leading(int ndim, const int64_t *shape) {
  const int64_t last = ndim > 0 ? shape[ndim - 1] : 1;
  return last == 0 ? 0 : numel(ndim, shape) / last;
}

constexpr float kSqrt2OverPi = 0.79788456f;  // Megatron's bias-GeLU constants
constexpr float kCubic = 0.044715f;
constexpr float kCubicSlope = 0.1070322243f;  // 3 * 0.044715 * sqrt(2 / pi)
constexpr float kMaskedScore = -10000.0f;     // Megatron's masked attention score
constexpr int64_t kParallelMin = 1 << 15;     // fewer elements than this: one thread (waking more costs more)

// Threads of every parallel region here: SetThreads(n) from Python (cpu_kernels.set_threads), else OpenMP's
// default. A setting of our own rather than OMP_NUM_THREADS, which libgomp reads once when MindSpore loads it
// and which msrun sets for every worker (to an eighth of the cores: 1 on small hosts).
std::atomic<int> g_threads{0};

int kernel_threads() {
  const int set = g_threads.load(std::memory_order_relaxed);
  return set > 0 ? set : omp_get_max_threads();
}

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

// One row of softmax(where(mask, -10000, x * scale)) over k entries; p may be x (in place).
inline void masked_softmax_row(const float *x, const bool *m, float scale, float *p, int64_t k) {
  float top = -INFINITY;  // a NaN in the row is not the max, but reaches every output through the sum
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < k; ++j) {
    p[j] = m[j] ? kMaskedScore : x[j] * scale;
    top = p[j] > top ? p[j] : top;
  }
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < k; ++j) {
    p[j] = exp_or_zero(p[j] - top);
    total += p[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) p[j] = p[j] / total;
}

// Its gradient: dx = where(mask, 0, scale * p * (dp - sum(dp * p))); dx may be dp (in place).
inline void masked_softmax_row_grad(const float *p, const float *dp, const bool *m, float scale, float *dx,
                                    int64_t k) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < k; ++j) dot += dp[j] * p[j];
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) dx[j] = m[j] ? 0.0f : (dp[j] - dot) * p[j] * scale;
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

// The elements of tensors 0 .. n-1 taken as one sequence cut into blocks of at most kBlock, so that a
// threaded loop over the blocks shares tensors of any sizes evenly among the threads.
struct TensorBlocks {
  static constexpr int64_t kBlock = 1 << 14;
  struct Block {
    int tensor;
    int64_t start, size;
  };
  std::vector<Block> list;
  int64_t total = 0;
  TensorBlocks(int n, const int *ndims, int64_t *const *shapes) {
    for (int k = 0; k < n; ++k) {
      const int64_t size = numel(ndims[k], shapes[k]);
      total += size;
      for (int64_t start = 0; start < size; start += kBlock) list.push_back({k, start, std::min(kBlock, size - start)});
    }
  }
  // body(block, index) for every block, the blocks shared among the kernel threads
  template <class Body>
  void for_each(Body &&body) const {
    const int64_t count = static_cast<int64_t>(list.size());
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (total >= kParallelMin)
    for (int64_t b = 0; b < count; ++b) body(list[static_cast<size_t>(b)], b);
  }
};

}  // namespace

extern "C" {

// y = x / 2 (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))
int GeluTanhForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = numel(ndims[0], shapes[0]);
#pragma omp parallel for simd schedule(static) num_threads(kernel_threads()) if (n >= kParallelMin)
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
#pragma omp parallel for simd schedule(static) num_threads(kernel_threads()) if (n >= kParallelMin)
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
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (n_rows * k >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) masked_softmax_row(x + r * k, mask + rows.offset(r), scale, p + r * k, k);
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
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (n_rows * k >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    masked_softmax_row_grad(p + r * k, dp + r * k, mask + rows.offset(r), scale, dx + r * k, k);
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
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (n_rows * v >= kParallelMin)
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
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (n_rows * v >= kParallelMin)
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

// ---- gradient statistics, clipping and the optimizer step, over many tensors at once

// ok [1] = 1 when every element of every input is finite, else 0 (an exponent of all ones is inf or nan);
// inputs params[0 .. nparam - 1), the output last.
int AllFinite(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const TensorBlocks blocks(nparam - 1, ndims, shapes);
  std::vector<uint32_t> bad(blocks.list.size(), 0);
  blocks.for_each([&](const TensorBlocks::Block &block, int64_t b) {
    const uint32_t *x = static_cast<const uint32_t *>(params[block.tensor]) + block.start;
    uint32_t found = 0;
#pragma omp simd reduction(| : found)
    for (int64_t i = 0; i < block.size; ++i) found |= static_cast<uint32_t>((x[i] & 0x7f800000u) == 0x7f800000u);
    bad[static_cast<size_t>(b)] = found;
  });
  const bool finite = std::all_of(bad.begin(), bad.end(), [](uint32_t found) { return found == 0; });
  static_cast<float *>(params[nparam - 1])[0] = finite ? 1.0f : 0.0f;
  return 0;
}

// total [1] = sum of x^2 over every element of every input, accumulated in double per block and the blocks
// added in order (the same bits for any thread count); inputs params[0 .. nparam - 1), the output last.
int SquareSum(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const TensorBlocks blocks(nparam - 1, ndims, shapes);
  std::vector<double> partial(blocks.list.size(), 0.0);
  blocks.for_each([&](const TensorBlocks::Block &block, int64_t b) {
    const float *x = static_cast<const float *>(params[block.tensor]) + block.start;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < block.size; ++i) sum += static_cast<double>(x[i]) * x[i];
    partial[static_cast<size_t>(b)] = sum;
  });
  double total = 0.0;
  for (double s : partial) total += s;
  static_cast<float *>(params[nparam - 1])[0] = static_cast<float>(total);
  return 0;
}

// One AdamW step in place over n parameters, with torch.optim.AdamW's arithmetic (Megatron's "adam"):
// inputs p[0..n), g[0..n), m[0..n), v[0..n), then h [7] = (1 - lr wd, 1 - beta1, beta2, 1 - beta2,
// sqrt(1 - beta2^t), eps, -lr / (1 - beta1^t)) in float32; the one output [1] is a dummy. The parameters
// and both moments are overwritten, which MindSpore does not see: pass the tensors that are to change.
int AdamWStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int n = (nparam - 2) / 4;
  const float *h = static_cast<const float *>(params[4 * n]);
  const float decay = h[0], one_minus_beta1 = h[1], beta2 = h[2], one_minus_beta2 = h[3];
  const float bias_correction2_sqrt = h[4], eps = h[5], neg_step_size = h[6];
  const TensorBlocks blocks(n, ndims, shapes);
  blocks.for_each([&](const TensorBlocks::Block &block, int64_t) {
    const int k = block.tensor;
    float *p = static_cast<float *>(params[k]) + block.start;
    const float *g = static_cast<const float *>(params[n + k]) + block.start;
    float *m = static_cast<float *>(params[2 * n + k]) + block.start;
    float *v = static_cast<float *>(params[3 * n + k]) + block.start;
#pragma omp simd
    for (int64_t i = 0; i < block.size; ++i) {
      m[i] = m[i] + one_minus_beta1 * (g[i] - m[i]);  // torch's lerp
      v[i] = v[i] * beta2 + one_minus_beta2 * g[i] * g[i];
      p[i] = p[i] * decay + neg_step_size * (m[i] / (std::sqrt(v[i]) / bias_correction2_sqrt + eps));
    }
  });
  static_cast<float *>(params[nparam - 1])[0] = 1.0f;
  return 0;
}

// y[k] = x[k] * c for every input x[0..n) (gradient clipping): inputs x[0..n), c [1], then the outputs
int Scale(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int n = (nparam - 1) / 2;
  const float c = *static_cast<const float *>(params[n]);
  const TensorBlocks blocks(n, ndims, shapes);
  blocks.for_each([&](const TensorBlocks::Block &block, int64_t) {
    const float *x = static_cast<const float *>(params[block.tensor]) + block.start;
    float *y = static_cast<float *>(params[n + 1 + block.tensor]) + block.start;
#pragma omp simd
    for (int64_t i = 0; i < block.size; ++i) y[i] = x[i] * c;
  });
  return 0;
}

// y [..., C] = x [..., C] + b [C] (a linear layer's bias)
int BiasAddForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t c = shapes[1][0], n_rows = leading(ndims[0], shapes[0]);
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (n_rows * c >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) y[r * c + j] = x[r * c + j] + b[j];
  }
  return 0;
}

// db [C] = sum over the rows of dy [..., C]; each thread sums a block of rows, the blocks are added in
// thread order (the same bits for a given thread count).
int ColumnSum(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  float *db = static_cast<float *>(params[1]);
  const int64_t c = shapes[1][0], n_rows = leading(ndims[0], shapes[0]);
  const int threads = n_rows * c >= kParallelMin ? kernel_threads() : 1;
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
#pragma omp parallel for schedule(static) num_threads(kernel_threads()) if (n_rows * h >= kParallelMin)
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
  const int threads = n_rows * h >= kParallelMin ? kernel_threads() : 1;
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

// ---- matrix products through a BLAS loaded at run time: Intel MKL (the `mkl` wheel's libmkl_rt) when it is
// installed, else the OpenBLAS that numpy ships. Both run a linear layer's shapes faster than MindSpore 2.10's
// CPU MatMul. MINDTRON_BLAS is the library's path, chosen at build time (cpu_kernels.blas_library()).

namespace {

using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *,
                         int64_t, float, float *, int64_t);
using Sgemm32 = void (*)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
using IntSetter = int (*)(int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int kMklSequential = 1;                        // MKL_THREADING_SEQUENTIAL
constexpr int kMklCbwrAutoStrict = 2 | 0x10000;         // MKL_CBWR_AUTO | MKL_CBWR_STRICT

// The BLAS runs single-threaded: the kernels split large products over OpenMP's threads themselves (see
// gemm), so that one set of threads serves every kernel. OpenBLAS's own threads kept spinning on the cores
// after each product and slowed the kernels that followed. (The setting is process-wide: numpy's products
// in this process run on one thread too.) MKL is also asked for results that do not depend on the buffers'
// alignment, so a product gives the same bits wherever MindSpore placed its tensors.
struct Blas {
  Sgemm64 sgemm64 = nullptr;  // 64-bit integers: OpenBLAS in numpy's wheels (cblas_sgemm64_), MKL (cblas_sgemm_64)
  Sgemm32 sgemm32 = nullptr;
  Blas() {
#ifdef MINDTRON_BLAS
    void *lib = dlopen(MINDTRON_BLAS, RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr) return;
    if (auto mkl_layer = reinterpret_cast<IntSetter>(dlsym(lib, "MKL_Set_Threading_Layer"))) {
      auto mkl_cbwr = reinterpret_cast<IntSetter>(dlsym(lib, "MKL_CBWR_Set"));
      mkl_layer(kMklSequential);
      if (mkl_cbwr == nullptr || mkl_cbwr(kMklCbwrAutoStrict) != 0) return;  // not reproducible: leave it unused
    }
    for (const char *name : {"cblas_sgemm64_", "cblas_sgemm_64"}) {
      if (sgemm64 == nullptr) sgemm64 = reinterpret_cast<Sgemm64>(dlsym(lib, name));
    }
    if (sgemm64 == nullptr) sgemm32 = reinterpret_cast<Sgemm32>(dlsym(lib, "cblas_sgemm"));
    for (const char *name : {"openblas_set_num_threads64_", "openblas_set_num_threads"}) {
      if (auto set_threads = reinterpret_cast<void (*)(int)>(dlsym(lib, name))) set_threads(1);
    }
#endif
  }
};

Blas &blas() {
  static Blas instance;
  return instance;
}

// c [m, n] = op(a) op(b) + beta c, row-major, op(a) [m, k] and op(b) [k, n] with leading dimensions
// lda, ldb, ldc (at least 1, as BLAS requires even for an empty product), on the calling thread.
int gemm_ld(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
            const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  Blas &lib = blas();
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  lda = std::max<int64_t>(1, lda);
  ldb = std::max<int64_t>(1, ldb);
  ldc = std::max<int64_t>(1, ldc);
  if (lib.sgemm64 != nullptr) {
    lib.sgemm64(kRowMajor, ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  } else if (lib.sgemm32 != nullptr) {
    lib.sgemm32(kRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f, a,
                static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
  } else {
    return 1;
  }
  return 0;
}

// c [m, n] = op(a) op(b) on contiguous matrices. A product of 2^22 multiply-adds or more is cut into one
// block of rows (or of columns, when there are fewer rows) per OpenMP thread, each a BLAS call on its thread.
int gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float *a, const float *b, float *c) {
  const int64_t lda = trans_a ? m : k, ldb = trans_b ? k : n;
  const int threads = m * n * k >= (int64_t{1} << 22) ? kernel_threads() : 1;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    if (m >= n) {  // rows [lo, hi) of c: rows of op(a)
      const int64_t lo = m * t / used, hi = m * (t + 1) / used;
      const float *a_rows = trans_a ? a + lo : a + lo * lda;
      if (hi > lo) failed |= gemm_ld(trans_a, trans_b, hi - lo, n, k, a_rows, lda, b, ldb, 0.0f, c + lo * n, n);
    } else {  // columns [lo, hi) of c: columns of op(b)
      const int64_t lo = n * t / used, hi = n * (t + 1) / used;
      const float *b_cols = trans_b ? b + lo * ldb : b + lo;
      if (hi > lo) failed |= gemm_ld(trans_a, trans_b, m, hi - lo, k, a, lda, b_cols, ldb, 0.0f, c + lo, n);
    }
  }
  return failed;
}

// ---- attention: softmax(where(mask, -10000, q k^T scale)) v for each batch entry and head, read from and
// written to the [s, b, heads, hn] layout of the attention's projections (no transposes). The n query heads
// share g key/value groups, n/g consecutive heads per group. Each (batch entry, group) is one task on one
// thread, its products on that thread. Queries go in blocks of kRowBlock rows, and a block's products
// stop after the last key that one of its rows may see, which halves the work under the causal mask. The
// keys skipped are masked for every row of the block: their probability is exactly 0 (the exponential of
// -10000 below the row's max underflows) and their score is never read, so nothing changes but the time.

constexpr int64_t kRowBlock = 64;

struct AttentionShape {
  int64_t sq, sk, batch, heads, groups, hn, mask_batch, mask_heads, blocks;
  // q [sq, b, n, hn], k and v [sk, b, g, hn], mask [MB, MN, sq, sk] with MB in {1, b}, MN in {1, n}
  // both kernels take q, k, v, mask as their first inputs
  explicit AttentionShape(int64_t **shapes)
      : sq(shapes[0][0]), sk(shapes[1][0]), batch(shapes[0][1]), heads(shapes[0][2]), groups(shapes[1][2]),
        hn(shapes[0][3]), mask_batch(shapes[3][0]), mask_heads(shapes[3][1]),
        blocks((sq + kRowBlock - 1) / kRowBlock) {}
  int64_t q_ld() const { return batch * heads * hn; }
  int64_t kv_ld() const { return batch * groups * hn; }
  int64_t mask_slice(int64_t b, int64_t h) const {
    return (mask_batch == 1 ? 0 : b) * mask_heads + (mask_heads == 1 ? 0 : h);
  }
  int64_t score_elements() const { return batch * heads * sq * sk; }
};

// For each mask slice [sq, sk] and query block: how many keys the block's products need. That is 1 + the
// last key some row of the block may see, or all sk keys if a row sees none (its softmax is uniform).
std::vector<int64_t> block_keys(const bool *mask, const AttentionShape &a) {
  std::vector<int64_t> keys(static_cast<size_t>(a.mask_batch * a.mask_heads * a.blocks), 0);
  for (int64_t slice = 0; slice < a.mask_batch * a.mask_heads; ++slice) {
    for (int64_t i = 0; i < a.sq; ++i) {
      const bool *row = mask + (slice * a.sq + i) * a.sk;
      int64_t last = a.sk - 1;
      while (last >= 0 && row[last]) --last;
      int64_t &need = keys[static_cast<size_t>(slice * a.blocks + i / kRowBlock)];
      need = std::max(need, last < 0 ? a.sk : last + 1);
    }
  }
  return keys;
}

int attention_threads(const AttentionShape &a) {
  return a.score_elements() >= kParallelMin ? kernel_threads() : 1;
}

}  // namespace

extern "C" {

// inputs: q [sq, b, n, hn], k, v [sk, b, g, hn], mask (bool) [MB, MN, sq, sk], scale [1];
// outputs: context [sq, b, n, hn], probs [b, n, sq, sk] (kept for the gradient).
int AttentionForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const bool *mask = static_cast<const bool *>(params[3]);
  const float scale = *static_cast<const float *>(params[4]);
  float *context = static_cast<float *>(params[5]), *probs = static_cast<float *>(params[6]);
  const AttentionShape a(shapes);
  const std::vector<int64_t> keys = block_keys(mask, a);
  const int64_t q_ld = a.q_ld(), kv_ld = a.kv_ld(), per_group = a.heads / a.groups;
  int failed = 0;
#pragma omp parallel for schedule(static) num_threads(attention_threads(a)) reduction(| : failed)
  for (int64_t task = 0; task < a.batch * a.groups; ++task) {
    const int64_t b = task / a.groups, group = task % a.groups;
    const float *kg = k + task * a.hn, *vg = v + task * a.hn;
    for (int64_t h = group * per_group; h < (group + 1) * per_group; ++h) {
      const int64_t slice = a.mask_slice(b, h);
      const float *qh = q + (b * a.heads + h) * a.hn;
      float *ch = context + (b * a.heads + h) * a.hn, *ph = probs + (b * a.heads + h) * a.sq * a.sk;
      for (int64_t block = 0; block < a.blocks; ++block) {
        const int64_t r0 = block * kRowBlock, rows = std::min(kRowBlock, a.sq - r0);
        const int64_t used = keys[static_cast<size_t>(slice * a.blocks + block)];
        float *pb = ph + r0 * a.sk;
        failed |= gemm_ld(false, true, rows, used, a.hn, qh + r0 * q_ld, q_ld, kg, kv_ld, 0.0f, pb, a.sk);
        for (int64_t i = 0; i < rows; ++i) {
          float *row = pb + i * a.sk;
          masked_softmax_row(row, mask + (slice * a.sq + r0 + i) * a.sk, scale, row, used);
          std::fill(row + used, row + a.sk, 0.0f);
        }
        failed |= gemm_ld(false, false, rows, a.hn, used, pb, a.sk, vg, kv_ld, 0.0f, ch + r0 * q_ld, q_ld);
      }
    }
  }
  return failed;
}

// inputs: q, k, v, mask, scale as in the forward, probs [b, n, sq, sk], dcontext [sq, b, n, hn];
// outputs: dq [sq, b, n, hn], dk, dv [sk, b, g, hn].
int AttentionBackward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const bool *mask = static_cast<const bool *>(params[3]);
  const float *probs = static_cast<const float *>(params[4]), *dcontext = static_cast<const float *>(params[5]);
  const float scale = *static_cast<const float *>(params[6]);
  float *dq = static_cast<float *>(params[7]), *dk = static_cast<float *>(params[8]);
  float *dv = static_cast<float *>(params[9]);
  const AttentionShape a(shapes);
  const std::vector<int64_t> keys = block_keys(mask, a);
  const int64_t q_ld = a.q_ld(), kv_ld = a.kv_ld(), per_group = a.heads / a.groups;
  std::fill(dk, dk + a.sk * kv_ld, 0.0f);  // summed over the query blocks and the group's heads
  std::fill(dv, dv + a.sk * kv_ld, 0.0f);
  int failed = 0;
#pragma omp parallel num_threads(attention_threads(a)) reduction(| : failed)
  {
    std::vector<float> dscores(static_cast<size_t>(kRowBlock * a.sk));  // this thread's block of dprobs
    float *ds = dscores.data();
#pragma omp for schedule(static)
    for (int64_t task = 0; task < a.batch * a.groups; ++task) {
      const int64_t b = task / a.groups, group = task % a.groups;
      const float *kg = k + task * a.hn, *vg = v + task * a.hn;
      float *dkg = dk + task * a.hn, *dvg = dv + task * a.hn;
      for (int64_t h = group * per_group; h < (group + 1) * per_group; ++h) {
        const int64_t slice = a.mask_slice(b, h), offset = (b * a.heads + h) * a.hn;
        const float *qh = q + offset, *gh = dcontext + offset, *ph = probs + (b * a.heads + h) * a.sq * a.sk;
        float *dqh = dq + offset;
        for (int64_t block = 0; block < a.blocks; ++block) {
          const int64_t r0 = block * kRowBlock, rows = std::min(kRowBlock, a.sq - r0);
          const int64_t used = keys[static_cast<size_t>(slice * a.blocks + block)];
          const float *pb = ph + r0 * a.sk, *gb = gh + r0 * q_ld;
          // dv += p^T dcontext; dprobs = dcontext v^T; dscores from the softmax's gradient
          failed |= gemm_ld(true, false, used, a.hn, rows, pb, a.sk, gb, q_ld, 1.0f, dvg, kv_ld);
          failed |= gemm_ld(false, true, rows, used, a.hn, gb, q_ld, vg, kv_ld, 0.0f, ds, a.sk);
          for (int64_t i = 0; i < rows; ++i) {
            masked_softmax_row_grad(pb + i * a.sk, ds + i * a.sk, mask + (slice * a.sq + r0 + i) * a.sk, scale,
                                    ds + i * a.sk, used);
          }
          // dq = dscores k; dk += dscores^T q
          failed |= gemm_ld(false, false, rows, a.hn, used, ds, a.sk, kg, kv_ld, 0.0f, dqh + r0 * q_ld, q_ld);
          failed |= gemm_ld(true, false, used, a.hn, rows, ds, a.sk, qh + r0 * q_ld, q_ld, 1.0f, dkg, kv_ld);
        }
      }
    }
  }
  return failed;
}

// Sets the threads of the kernels' parallel regions (n >= 1; 0 goes back to OpenMP's default); returns the
// count now in force.
int SetThreads(int n) {
  g_threads.store(n > 0 ? n : 0, std::memory_order_relaxed);
  return kernel_threads();
}

// The threads the kernels' parallel regions use now.
int Threads() { return kernel_threads(); }

// 1 when the BLAS loaded (the Python side checks before using the products below).
int BlasAvailable() { return blas().sgemm64 != nullptr || blas().sgemm32 != nullptr ? 1 : 0; }

// The BLAS this library was built to load (its path; empty when built without one), for messages.
const char *BlasPath() {
#ifdef MINDTRON_BLAS
  return MINDTRON_BLAS;
#else
  return "";
#endif
}

// A linear layer's products, the rows of x being all its leading dimensions:
// y [..., out] = x [..., in] w^T with w [out, in]
int LinearForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t rows = leading(ndims[0], shapes[0]), out = shapes[1][0], in = shapes[1][1];
  return gemm(false, true, rows, out, in, static_cast<const float *>(params[0]),
              static_cast<const float *>(params[1]), static_cast<float *>(params[2]));
}

// dx [..., in] = dy [..., out] w
int LinearGradInput(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t rows = leading(ndims[0], shapes[0]), out = shapes[1][0], in = shapes[1][1];
  return gemm(false, false, rows, in, out, static_cast<const float *>(params[0]),
              static_cast<const float *>(params[1]), static_cast<float *>(params[2]));
}

// dw [out, in] = dy^T x, summed over the rows of dy [..., out] and x [..., in]
int LinearGradWeight(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t rows = leading(ndims[0], shapes[0]);
  const int64_t out = shapes[0][ndims[0] - 1], in = shapes[1][ndims[1] - 1];
  return gemm(true, false, out, in, rows, static_cast<const float *>(params[0]),
              static_cast<const float *>(params[1]), static_cast<float *>(params[2]));
}

}  // extern "C"
