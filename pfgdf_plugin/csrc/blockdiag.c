/* Inference kernels of the MPD-converted block-diagonal Linear (pfgdf_plugin.native loads them).
 *
 * Plain C, no Python or torch headers: the caller passes contiguous float32 / int64 buffers.
 * Index entries outside [0, limit) read as zero (the padded slots of an unbalanced split),
 * so a damaged index buffer can not read outside its source. Single-threaded; memory-bound
 * work (gathers, batch-1 matrix-vector products) that PyTorch would run as several kernels.
 */
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PFGDF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PFGDF_CLONES
#endif

/* Rows of the weight requested ahead of use at batch 1: the weights stream from memory once per
 * call, and asking for them early measured 20-35% faster than the hardware prefetcher alone. */
enum { AHEAD = 8 };

/* Batch 1: y[c*O + o] = b[c*O + o] + sum_i x[idx[c*I + i]] * W[c][i][o], W stored [C, I, O].
 * idx NULL: the input already is in block layout (x[c*I + i]). b NULL: no bias. */
PFGDF_CLONES
void pfgdf_block_gemv(const float *restrict x, const int64_t *restrict idx, int64_t nfeat,
                      const float *restrict w, const float *restrict b, float *restrict y,
                      int64_t blocks, int64_t block_in, int64_t block_out) {
  for (int64_t c = 0; c < blocks; ++c) {
    float *restrict yc = y + c * block_out;
    if (b)
      memcpy(yc, b + c * block_out, (size_t)block_out * sizeof(float));
    else
      memset(yc, 0, (size_t)block_out * sizeof(float));
    const float *restrict wc = w + c * block_in * block_out;
    for (int64_t i = 0; i < block_in; ++i) {
      int64_t k = c * block_in + i;
      float xv = !idx ? x[k] : (uint64_t)idx[k] < (uint64_t)nfeat ? x[idx[k]] : 0.0f;
      const float *restrict row = wc + i * block_out;
      if (k + AHEAD < blocks * block_in) /* the rows AHEAD further on, possibly in the next block */
        for (int64_t l = 0; l < block_out; l += 16) __builtin_prefetch(row + AHEAD * block_out + l, 0, 0);
      for (int64_t o = 0; o < block_out; ++o) yc[o] += xv * row[o];
    }
  }
}

/* Columns of a batch-major input: out[r][k] = x[r * stride + idx[k]] + b[idx[k]] for r < n, k < m
 * (b NULL: no bias). Four rows at a time: one index read serves four loads and four sequential stores. */
PFGDF_CLONES
void pfgdf_gather_cols(const float *restrict x, int64_t n, int64_t stride, int64_t nfeat,
                       const int64_t *restrict idx, const float *restrict b, int64_t m, float *restrict out) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    const float *x0 = x + r * stride, *x1 = x0 + stride, *x2 = x1 + stride, *x3 = x2 + stride;
    float *restrict o0 = out + r * m, *restrict o1 = o0 + m, *restrict o2 = o1 + m, *restrict o3 = o2 + m;
    for (int64_t k = 0; k < m; ++k) {
      int64_t s = idx[k];
      if ((uint64_t)s < (uint64_t)nfeat) {
        float bias = b ? b[s] : 0.0f;
        o0[k] = x0[s] + bias; o1[k] = x1[s] + bias; o2[k] = x2[s] + bias; o3[k] = x3[s] + bias;
      } else {
        o0[k] = o1[k] = o2[k] = o3[k] = 0.0f;
      }
    }
  }
  for (; r < n; ++r) {
    const float *restrict xr = x + r * stride;
    float *restrict o = out + r * m;
    for (int64_t k = 0; k < m; ++k) {
      int64_t s = idx[k];
      o[k] = (uint64_t)s < (uint64_t)nfeat ? xr[s] + (b ? b[s] : 0.0f) : 0.0f;
    }
  }
}

/* Features-first [rows, n] to batch-first [n, m]: out[r][k] = src[idx[k]][r] + b[idx[k]]
 * (idx NULL: k itself, m == rows; b NULL: no bias). Sixteen k at a time, so every output row
 * gets a whole cache line per pass while the sixteen source rows are read sequentially. */
PFGDF_CLONES
void pfgdf_gather_rows_t(const float *restrict src, int64_t rows, int64_t n, const int64_t *restrict idx,
                         const float *restrict b, int64_t m, float *restrict out) {
  enum { T = 16 };
  static const float zeros[1] = {0.0f};
  for (int64_t k0 = 0; k0 < m; k0 += T) {
    int64_t kn = m - k0 < T ? m - k0 : T;
    const float *p[T];
    int64_t step[T];
    float bias[T];
    for (int64_t j = 0; j < kn; ++j) {
      int64_t s = idx ? idx[k0 + j] : k0 + j;
      int ok = (uint64_t)s < (uint64_t)rows;
      p[j] = ok ? src + s * n : zeros; /* a bad index reads the one zero, n times */
      step[j] = ok;
      bias[j] = ok && b ? b[s] : 0.0f;
    }
    for (int64_t r = 0; r < n; ++r) {
      float *restrict o = out + r * m + k0;
      for (int64_t j = 0; j < kn; ++j) o[j] = p[j][r * step[j]] + bias[j];
    }
  }
}
