/* Inference kernels of the MPD-converted block-diagonal Linear (pfgdf_plugin.native loads them).
 *
 * Plain C, no Python or torch headers: the caller passes contiguous float32 / int64 buffers.
 * Index entries outside [0, limit) read as zero (the padded slots of an unbalanced split),
 * so a damaged index buffer can not read outside its source. Single-threaded: a layer's whole
 * inference in one call (gather, block product, bias, ReLU, scatter), which PyTorch would run as
 * several kernels: a matrix-vector product at batch 1, a blocked matrix product for batches. The
 * kernels are x86-64 AVX2 + FMA code (GCC or Clang) and run where the CPU has them (pfgdf_tuned());
 * the batch products use AVX-512 tiles where the CPU has that too (pfgdf_isa());
 * a portable build of the same C was exact but 20-30x slower for batches, so elsewhere the library
 * only says no and pfgdf_plugin.native leaves it off (the layers then run on PyTorch operations).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define PFGDF_AVX2 __attribute__((target("avx2,fma")))
#define PFGDF_AVX512 __attribute__((target("avx512f,avx2,fma")))

/* Whether this CPU runs the kernels (AVX2 and FMA); the products return -3 where it does not. */
int pfgdf_tuned(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

/* The widest instructions the batch products use: 2 AVX-512 where the CPU has it (tiles of 16-float
 * registers, twice the multiplications a cycle), 1 AVX2 + FMA, 0 none; pfgdf_set_isa caps it (to
 * compare both on one CPU). The batch-1 product reads its weights once and stays AVX2. */
static int pfgdf_isa_cap = 2;

int pfgdf_isa(void) {
  if (!pfgdf_tuned()) return 0;
  int have = __builtin_cpu_supports("avx512f") ? 2 : 1, cap = __atomic_load_n(&pfgdf_isa_cap, __ATOMIC_RELAXED);
  return have < cap ? have : cap;
}

/* Caps pfgdf_isa at level (1 or 2); returns the previous cap, or -1 for another level. */
int pfgdf_set_isa(int level) {
  if (level != 1 && level != 2) return -1;
  return __atomic_exchange_n(&pfgdf_isa_cap, level, __ATOMIC_RELAXED);
}

/* Scratch memory kept per thread between calls, up to SCRATCH_KEEP bytes: allocating and freeing
 * a few megabytes on every call let the C library return the pages and fault them in again on the
 * next call (up to 1.3 ms more for a Linear(4096) at batch 64). Freed when the thread ends. */
enum { SCRATCH_KEEP = 32 << 20 };
typedef struct { size_t size; char pad[56]; } pfgdf_scratch_head; /* 64 bytes: the data stays aligned */
static pthread_key_t pfgdf_scratch_key;
static pthread_once_t pfgdf_scratch_once = PTHREAD_ONCE_INIT;
static int pfgdf_scratch_ok;
static void pfgdf_scratch_init(void) { pfgdf_scratch_ok = !pthread_key_create(&pfgdf_scratch_key, free); }

/* bytes of scratch: the thread's kept block (grown when too small), or past SCRATCH_KEEP a new one
 * that the caller frees (*owned). NULL if out of memory. */
static void *pfgdf_scratch(size_t bytes, void **owned) {
  *owned = NULL;
  if (bytes > SCRATCH_KEEP || pthread_once(&pfgdf_scratch_once, pfgdf_scratch_init) || !pfgdf_scratch_ok)
    return *owned = malloc(bytes);
  pfgdf_scratch_head *h = pthread_getspecific(pfgdf_scratch_key);
  if (h && h->size >= bytes) return h + 1;
  free(h);
  h = malloc(sizeof *h + bytes);
  if (h) h->size = bytes;
  pthread_setspecific(pfgdf_scratch_key, h);
  return h ? h + 1 : NULL;
}

/* Rows of the weight requested ahead of use at batch 1; 8 and 32 rows measured the same in the
 * stack. Requested into every cache level: a non-temporal request (hint 0) kept weights that had
 * left the second-level cache from ever coming back on some CPUs, so every call read them from the
 * last level (eight 128 x 128 blocks: 57 us a call instead of 4.5; three such layers after a dense
 * stack, 184 us instead of 107). */
enum { AHEAD = 16 };

/* Batch 1: y[c*O + o] = b[c*O + o] + sum_i x[idx[c*I + i]] * W[c][i][o], W stored [C, I, O].
 * idx NULL: the input already is in block layout (x[c*I + i]). b NULL: no bias. 64 outputs at a time
 * stay in registers over all of a block's rows (updating y row by row stored every output once a
 * row: 11.4 us a call against 8.6 for eight 128 x 128 blocks). */
PFGDF_AVX2 static void pfgdf_gemv_fma(const float *restrict x, const int64_t *restrict idx, int64_t nfeat,
                                      const float *restrict w, const float *restrict b, float *restrict y,
                                      int64_t blocks, int64_t block_in, int64_t block_out) {
  for (int64_t c = 0; c < blocks; ++c) {
    float *restrict yc = y + c * block_out;
    if (b)
      memcpy(yc, b + c * block_out, (size_t)block_out * sizeof(float));
    else
      memset(yc, 0, (size_t)block_out * sizeof(float));
    const float *restrict wc = w + c * block_in * block_out;
    int64_t o0 = 0;
    for (; o0 + 64 <= block_out; o0 += 64) { /* 64 outputs in eight registers over all the block's rows */
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_loadu_ps(yc + o0 + 8 * j);
      for (int64_t i = 0; i < block_in; ++i) {
        int64_t k = c * block_in + i;
        __m256 xv = _mm256_set1_ps(!idx ? x[k] : (uint64_t)idx[k] < (uint64_t)nfeat ? x[idx[k]] : 0.0f);
        const float *restrict row = wc + i * block_out + o0;
        if (i + AHEAD < block_in)
          for (int l = 0; l < 64; l += 16) __builtin_prefetch(row + AHEAD * block_out + l, 0, 3);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(row + 8 * j), acc[j]);
      }
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(yc + o0 + 8 * j, acc[j]);
    }
    for (int64_t i = 0; o0 < block_out && i < block_in; ++i) { /* the outputs past the last whole 64 */
      int64_t k = c * block_in + i;
      float xv = !idx ? x[k] : (uint64_t)idx[k] < (uint64_t)nfeat ? x[idx[k]] : 0.0f;
      const float *restrict row = wc + i * block_out;
      for (int64_t o = o0; o < block_out; ++o) yc[o] += xv * row[o];
    }
  }
}

/* Eight by eight floats in AVX2 registers: out[i * ldo + j] = p[j][i]. */
PFGDF_AVX2 static inline void pfgdf_t8(const float *const *p, float *out, int64_t ldo) {
  __m256 a0 = _mm256_loadu_ps(p[0]), a1 = _mm256_loadu_ps(p[1]), a2 = _mm256_loadu_ps(p[2]);
  __m256 a3 = _mm256_loadu_ps(p[3]), a4 = _mm256_loadu_ps(p[4]), a5 = _mm256_loadu_ps(p[5]);
  __m256 a6 = _mm256_loadu_ps(p[6]), a7 = _mm256_loadu_ps(p[7]);
  __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
  __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
  __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
  __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(out + ldo, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(out + 2 * ldo, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(out + 3 * ldo, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(out + 4 * ldo, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(out + 5 * ldo, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(out + 6 * ldo, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(out + 7 * ldo, _mm256_permute2f128_ps(s3, s7, 0x31));
}

/* Features-first [rows, n] to batch-first [n, m]: out[r][k] = src[idx[k]][r] (idx NULL: k itself,
 * m == rows); every idx entry in [0, rows) (the caller checks). Eight rows by eight columns in
 * registers, 128 columns at a time (their source rows stay in cache while every row of out gets
 * them); the rows and columns past the last whole eight one by one. */
PFGDF_AVX2 static void pfgdf_gather_rows_t(const float *restrict src, int64_t n, const int64_t *restrict idx,
                                           int64_t m, float *restrict out) {
  for (int64_t k1 = 0; k1 + 8 <= m; k1 += 128)
    for (int64_t r = 0; r + 8 <= n; r += 8)
      for (int64_t k0 = k1; k0 + 8 <= m && k0 < k1 + 128; k0 += 8) {
        const float *q[8];
        for (int j = 0; j < 8; ++j) q[j] = src + (idx ? idx[k0 + j] : k0 + j) * n + r;
        pfgdf_t8(q, out + r * m + k0, m);
      }
  int64_t r8 = n / 8 * 8, k8 = m / 8 * 8;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t k = r < r8 ? k8 : 0; k < m; ++k) out[r * m + k] = src[(idx ? idx[k] : k) * n + r];
}

/* Batch-first [n, nf] (rows rs apart) to features-first [nf, n]: xt[f][r] = src[r * rs + f]. Eight
 * by eight in registers, 64 features at a time; the rows and features past the last whole eight one
 * by one. */
PFGDF_AVX2 static void pfgdf_transpose(const float *restrict src, int64_t n, int64_t nf, int64_t rs,
                                       float *restrict xt) {
  for (int64_t f1 = 0; f1 + 8 <= nf; f1 += 64)
    for (int64_t r = 0; r + 8 <= n; r += 8)
      for (int64_t f = f1; f + 8 <= nf && f < f1 + 64; f += 8) {
        const float *q[8];
        for (int j = 0; j < 8; ++j) q[j] = src + (r + j) * rs + f;
        pfgdf_t8(q, xt + f * n + r, n);
      }
  int64_t r8 = n / 8 * 8, f8 = nf / 8 * 8;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t f = r < r8 ? f8 : 0; f < nf; ++f) xt[f * n + r] = src[r * rs + f];
}

/* Block matrix product of a batch, into features-first:
 *   out[c*O + o][r] = act(b[c*O + o] + sum_i W[c][i][o] * x(idx[c*I + i], r)),  W stored [C, I, O],
 * out [C*O, n], act max(0, .) if relu else the identity, where input feature s of batch column r is
 * x(s, r) = src[s * fs + r], s < rows (features first, rows fs >= n apart); idx NULL: feature c*I + i.
 * Blocked as a GEMM is: the gathered inputs of up to 256 KiB of columns and panels of 6 outputs' weights
 * (up to 64 KiB of them: 10% faster than 128 KiB for a Linear(4096) at batch 64, 18% for 8 blocks of
 * 256 x 256 at batch 32) are packed in the order the tiles read them (the gather costs nothing more
 * than that copy, which the product needed anyway: rows a power of two apart share a handful of cache
 * sets), the inner dimension goes in pieces of KC so a tile's inputs and weights stay in the
 * first-level cache, and register tiles are 6 outputs x 16 columns (12 accumulators of 8 floats).
 * With AVX-512 the tiles are 8 x 32 (16 accumulators of 16 floats) and the pieces KC_WIDE (256 took
 * 15-25% longer: the wider input panel and the weights no longer fit the first-level cache
 * together). The packing loops request their rows ahead; the panels go in wpack (pfgdf_blocking
 * floats), PANEL_PAD floats more apart than their size (a panel row is 32 bytes: panels 4 KiB apart
 * put every store of a row into one cache set, and the per-call product of a Linear(4096) at batch
 * 64 took 3.0 ms instead of 2.3). Weights prepacked once (pfgdf_pack_weights) skip that copy; the
 * tiles request them PANEL_AHEAD floats ahead, about a panel, as they are read in order. */
typedef float pfgdf_v8 __attribute__((vector_size(32)));
typedef int32_t pfgdf_v8i __attribute__((vector_size(32)));
enum { MR = 6, NR = 16, KC = 256, MR_WIDE = 8, NR_WIDE = 32, KC_WIDE = 128, PANEL_PAD = 16, PANEL_AHEAD = 2048,
       PACK_AHEAD = 24, SCATTER_MAX = 16384 };
_Static_assert(MR <= 8 && MR_WIDE <= 8, "the weight panels are copied eight floats a row");
/* The tile shape and inner pieces of a width (wide: AVX-512), for the product, its scratch and the
 * prepacked layout alike (constants where the width is). */
typedef struct { int64_t mr, nr, kc; } pfgdf_tiling;
static inline pfgdf_tiling pfgdf_tiling_of(int wide) {
  return wide ? (pfgdf_tiling){MR_WIDE, NR_WIDE, KC_WIDE} : (pfgdf_tiling){MR, NR, KC};
}
/* Unaligned vector loads and stores, and max(0, .). */
#define PFGDF_LOAD(v, p) memcpy(&(v), (p), sizeof(pfgdf_v8))
#define PFGDF_STORE(p, v) memcpy((p), &(v), sizeof(pfgdf_v8))
#define PFGDF_RELU(a) ((pfgdf_v8)((pfgdf_v8i)(a) & ((a) > (pfgdf_v8){0})))

/* One tile: xp [kc][NR] packed inputs, wp [kc][MR] packed weights. The accumulators start from the
 * bias bp [MR] (first piece of the inner dimension) or from what out holds (the later ones); rows
 * j < mr go to out + j * ldo (the others are padding), through max(0, .) if relu (the last piece). */
PFGDF_AVX2 static inline void pfgdf_tile(const float *restrict xp, const float *restrict wp, const float *restrict bp,
                                         int64_t kc, int relu, int64_t mr, float *restrict out, int64_t ldo) {
  pfgdf_v8 a0[MR], a1[MR];
  if (bp) {
    for (int j = 0; j < MR; ++j) a0[j] = a1[j] = (pfgdf_v8){0} + bp[j];
  } else {
    for (int j = 0; j < MR; ++j) { a0[j] = a1[j] = (pfgdf_v8){0}; }
    for (int64_t j = 0; j < mr; ++j) { PFGDF_LOAD(a0[j], out + j * ldo); PFGDF_LOAD(a1[j], out + j * ldo + 8); }
  }
  for (int64_t i = 0; i < kc; ++i, xp += NR, wp += MR) {
    pfgdf_v8 x0, x1;
    PFGDF_LOAD(x0, xp);
    PFGDF_LOAD(x1, xp + 8);
    __builtin_prefetch(wp + PANEL_AHEAD, 0, 3);
    for (int j = 0; j < MR; ++j) { a0[j] += wp[j] * x0; a1[j] += wp[j] * x1; }
  }
  if (relu)
    for (int j = 0; j < MR; ++j) { a0[j] = PFGDF_RELU(a0[j]); a1[j] = PFGDF_RELU(a1[j]); }
  if (mr == MR) {
    for (int j = 0; j < MR; ++j) { PFGDF_STORE(out + j * ldo, a0[j]); PFGDF_STORE(out + j * ldo + 8, a1[j]); }
  } else {
    float t[MR][NR];
    for (int j = 0; j < MR; ++j) { PFGDF_STORE(t[j], a0[j]); PFGDF_STORE(t[j] + 8, a1[j]); }
    for (int64_t j = 0; j < mr; ++j) memcpy(out + j * ldo, t[j], sizeof t[j]);
  }
}

/* The tile above with AVX-512: MR_WIDE outputs x NR_WIDE columns in 16 registers of 16 floats (per
 * step of the inner dimension two loads of inputs and eight broadcast weights for 16 multiply-adds);
 * xp is [kc][NR_WIDE], wp [kc][MR_WIDE]. */
typedef float pfgdf_v16 __attribute__((vector_size(64)));
typedef int32_t pfgdf_v16i __attribute__((vector_size(64)));
#define PFGDF_RELU16(a) ((pfgdf_v16)((pfgdf_v16i)(a) & ((a) > (pfgdf_v16){0})))
PFGDF_AVX512 static void pfgdf_tile_wide(const float *restrict xp, const float *restrict wp,
                                         const float *restrict bp, int64_t kc, int relu, int64_t mr,
                                         float *restrict out, int64_t ldo) {
  enum { NV = NR_WIDE / 16 };
  pfgdf_v16 a[MR_WIDE][NV];
  for (int j = 0; j < MR_WIDE; ++j)
    for (int v = 0; v < NV; ++v) {
      a[j][v] = (pfgdf_v16){0} + (bp ? bp[j] : 0.0f);
      if (!bp && j < mr) memcpy(&a[j][v], out + j * ldo + 16 * v, sizeof a[j][v]);
    }
  for (int64_t i = 0; i < kc; ++i, xp += NR_WIDE, wp += MR_WIDE) {
    pfgdf_v16 x[NV];
    for (int v = 0; v < NV; ++v) memcpy(&x[v], xp + 16 * v, sizeof x[v]);
    __builtin_prefetch(wp + PANEL_AHEAD, 0, 3);
    for (int j = 0; j < MR_WIDE; ++j)
      for (int v = 0; v < NV; ++v) a[j][v] += wp[j] * x[v];
  }
  for (int j = 0; j < MR_WIDE; ++j)
    for (int v = 0; v < NV; ++v) {
      if (relu) a[j][v] = PFGDF_RELU16(a[j][v]);
      if (j < mr) memcpy(out + j * ldo + 16 * v, &a[j][v], sizeof a[j][v]);
    }
}

/* One tile of either width. */
static inline __attribute__((always_inline)) void pfgdf_tile_any(int wide, const float *restrict xp,
                                                                 const float *restrict wp, const float *restrict bp,
                                                                 int64_t kc, int relu, int64_t mr,
                                                                 float *restrict out, int64_t ldo) {
  if (wide)
    pfgdf_tile_wide(xp, wp, bp, kc, relu, mr, out, ldo);
  else
    pfgdf_tile(xp, wp, bp, kc, relu, mr, out, ldo);
}

/* The blocking of a product with tiles of mr outputs x nr columns, the inner dimension in pieces of
 * kc: outputs whose packed weights fill 64 KiB (the whole block up to half as much again), columns
 * whose packed inputs fill 256 KiB; returns the floats their panels take. */
static int64_t pfgdf_blocking(int64_t n, int64_t in, int64_t bo, int64_t mr, int64_t nr, int64_t kc, int64_t *chunk,
                              int64_t *ncols) {
  int64_t kc_max = in < kc ? in : kc;
  *chunk = 16384 / kc_max / mr * mr;
  if (*chunk < mr) *chunk = mr;
  if (*chunk + *chunk / 2 >= bo) *chunk = (bo + mr - 1) / mr * mr;
  *ncols = 65536 / kc_max / nr * nr;
  if (*ncols < nr) *ncols = nr;
  if (*ncols > n) *ncols = (n + nr - 1) / nr * nr;
  return *chunk * kc_max + *chunk / mr * PANEL_PAD + *ncols * kc_max + mr;
}

/* After each tile: the next pf_lines cache lines of the next block's weights, so they come in while
 * the tiles compute. Only for weights packed on the way: prepacked ones are read in order, and the
 * tiles' own requests did better alone (a cold Linear(4096) at batch 64: 2.1 ms against 2.5). */
#define PFGDF_PREFETCH_NEXT                                                                                  \
  for (int64_t l = 0; l < pf_lines && pf < pf_end; ++l, pf += 64) __builtin_prefetch(pf, 0, 2)

/* The block product of a features-first input into features-first out, or (pos) into batch-first
 * out scattered by the tiles' stores; the panels in wpack; wide: the AVX-512 tiles. Compiled once for
 * each width (the two functions below), so that the tile and copy sizes are constants. */
#define PFGDF_GEMM_ARGS                                                                                     \
  const float *restrict src, int64_t rows, int64_t n, int64_t fs, const int64_t *restrict idx,              \
      const float *restrict w, const float *restrict b, int relu, float *restrict out, int64_t blocks,      \
      int64_t in, int64_t bo, const int64_t *restrict pos, int64_t m, float *restrict wpack,                \
      const float *restrict packed
static inline __attribute__((always_inline)) int pfgdf_block_gemm_fma(PFGDF_GEMM_ARGS, const int wide) {
  const pfgdf_tiling tiling = pfgdf_tiling_of(wide);
  const int64_t mr_t = tiling.mr, nr_t = tiling.nr, kc_t = tiling.kc;
  int64_t chunk, ncols, kc_max = in < kc_t ? in : kc_t;
  pfgdf_blocking(n, in, bo, mr_t, nr_t, kc_t, &chunk, &ncols);
  float *xpack = wpack + chunk * kc_max + chunk / mr_t * PANEL_PAD, *bpack = xpack + ncols * kc_max;
  int64_t tiles = (n + nr_t - 1) / nr_t * ((bo + mr_t - 1) / mr_t) * ((in + kc_t - 1) / kc_t);
  int64_t pf_lines = (in * bo / 16 + tiles - 1) / tiles; /* of the next block's weights, after each tile */
  const int64_t bop = (bo + mr_t - 1) / mr_t * mr_t; /* outputs of a block in whole panels */
  for (int64_t c = 0; c < blocks; ++c) {
    const float *wc = w + c * in * bo;
    const char *pf = (const char *)(wc + in * bo);
    const char *pf_end = c + 1 < blocks && !packed ? pf + sizeof(float) * in * bo : pf;
    const int64_t *ic = idx ? idx + c * in : NULL;
    for (int64_t n0 = 0; n0 < n; n0 += ncols) {
      int64_t ne = n - n0 < ncols ? n : n0 + ncols;
      for (int64_t k0 = 0; k0 < in; k0 += kc_t) {
        int64_t kc = in - k0 < kc_t ? in - k0 : kc_t;
        for (int64_t i = 0; i < kc; ++i) { /* tiles [kc][nr_t] of columns n0..; zeros past n or a bad index */
          int64_t s = ic ? ic[k0 + i] : c * in + k0 + i;
          if (i + PACK_AHEAD < kc) {
            int64_t sa = ic ? ic[k0 + i + PACK_AHEAD] : s + PACK_AHEAD;
            if ((uint64_t)sa < (uint64_t)rows)
              for (int64_t r = n0; r < ne; r += 16) __builtin_prefetch(src + sa * fs + r, 0, 3);
          }
          const float *row = (uint64_t)s < (uint64_t)rows ? src + s * fs : NULL;
          for (int64_t r0 = n0; r0 < ne; r0 += nr_t) {
            float *d = xpack + (r0 - n0) * kc + i * nr_t;
            int64_t nr = ne - r0 < nr_t ? ne - r0 : nr_t;
            if (row && nr == nr_t) { memcpy(d, row + r0, sizeof(float) * nr_t); continue; } /* inlined: a call
                                                                    per row of 16 took 15% of a product */
            for (int64_t k = 0; k < nr_t; ++k) d[k] = row && k < nr ? row[r0 + k] : 0.0f;
          }
        }
        for (int64_t o1 = 0; o1 < bo; o1 += chunk) {
          int64_t oe = bo - o1 < chunk ? bo : o1 + chunk;
          int64_t ps = kc * mr_t + PANEL_PAD; /* floats from one panel to the next */
          const float *wpk = packed ? packed + c * in * bop + k0 * bop : NULL; /* see pfgdf_pack_weights */
          for (int64_t i = 0; i < kc && !wpk; ++i) { /* panels [kc][mr_t] of outputs o1.., zeros past oe */
            const float *row = wc + (k0 + i) * bo;
            float *d = wpack + i * mr_t;
            int64_t whole = i + 1 < kc ? bo - 8 : -1; /* eight floats a panel row up to there (the next
                                                        row of a panel of six overwrites the extra two) */
            if (i + PACK_AHEAD < kc)
              for (int64_t o = o1; o < oe; o += 16) __builtin_prefetch(row + PACK_AHEAD * bo + o, 0, 3);
            for (int64_t o0 = o1; o0 < oe; o0 += mr_t, d += ps) {
              if (o0 <= whole) { memcpy(d, row + o0, sizeof(float) * 8); continue; }
              if (o0 + mr_t <= oe) { memcpy(d, row + o0, sizeof(float) * mr_t); continue; }
              for (int64_t j = 0; j < mr_t; ++j) d[j] = o0 + j < oe ? row[o0 + j] : 0.0f; /* no library call */
            }
          }
          for (int64_t o0 = o1; o0 < oe; o0 += mr_t) {
            int64_t mr = oe - o0 < mr_t ? oe - o0 : mr_t;
            for (int64_t r0 = n0; r0 < ne; r0 += nr_t) {
              int64_t nr = ne - r0 < nr_t ? ne - r0 : nr_t;
              const float *xp = xpack + (r0 - n0) * kc;
              const float *bp = NULL, *wp = wpk ? wpk + o0 * kc : wpack + (o0 - o1) / mr_t * ps;
              if (k0 == 0) {
                for (int64_t j = 0; j < mr_t; ++j) bpack[j] = b && j < mr ? b[c * bo + o0 + j] : 0.0f;
                bp = bpack;
              }
              if (pos) { /* batch first (one piece of the inner dimension): a tile in scratch, scattered */
                float t[MR_WIDE * NR_WIDE];
                const int64_t *pj = pos + c * bo + o0;
                pfgdf_tile_any(wide, xp, wp, bp, kc, relu && k0 + kc == in, mr, t, nr_t);
                PFGDF_PREFETCH_NEXT;
                for (int64_t r = 0; r < nr; ++r)
                  for (int64_t j = 0; j < mr; ++j)
                    if (pj[j] >= 0) out[(r0 + r) * m + pj[j]] = t[j * nr_t + r];
                continue;
              }
              float *o = out + (c * bo + o0) * n + r0;
              PFGDF_PREFETCH_NEXT;
              if (nr == nr_t) {
                pfgdf_tile_any(wide, xp, wp, bp, kc, relu && k0 + kc == in, mr, o, n);
              } else { /* the last columns: a whole tile in scratch, then the ones that exist */
                float t[MR_WIDE * NR_WIDE] = {0};
                for (int64_t j = 0; j < mr && !bp; ++j) memcpy(t + j * nr_t, o + j * n, sizeof(float) * (size_t)nr);
                pfgdf_tile_any(wide, xp, wp, bp, kc, relu && k0 + kc == in, mr, t, nr_t);
                for (int64_t j = 0; j < mr; ++j) memcpy(o + j * n, t + j * nr_t, sizeof(float) * (size_t)nr);
              }
            }
          }
        }
      }
    }
  }
  return 0;
}

#define PFGDF_GEMM_PASS src, rows, n, fs, idx, w, b, relu, out, blocks, in, bo, pos, m, wpack, packed
PFGDF_AVX2 static int pfgdf_block_gemm_avx2(PFGDF_GEMM_ARGS) { return pfgdf_block_gemm_fma(PFGDF_GEMM_PASS, 0); }
PFGDF_AVX512 static int pfgdf_block_gemm_avx512(PFGDF_GEMM_ARGS) { return pfgdf_block_gemm_fma(PFGDF_GEMM_PASS, 1); }

static int pfgdf_block_gemm_isa(PFGDF_GEMM_ARGS, int wide) {
  return wide ? pfgdf_block_gemm_avx512(PFGDF_GEMM_PASS) : pfgdf_block_gemm_avx2(PFGDF_GEMM_PASS);
}

/* Floats of a product's weights laid out for instructions level (1 AVX2, 2 AVX-512) by
 * pfgdf_pack_weights; 0 for another level. */
int64_t pfgdf_packed_floats(int64_t blocks, int64_t in, int64_t bo, int level) {
  if (level != 1 && level != 2) return 0;
  int64_t mr = pfgdf_tiling_of(level == 2).mr;
  return blocks * in * ((bo + mr - 1) / mr * mr);
}

/* The weights W [C, I, O] as the tiles read them, so that a product need not copy them on every call
 * (at batch 64 the copy took 15-25% of a product, for weights that do not change between calls): per
 * block, per piece of the inner dimension (KC or KC_WIDE rows), panels [kc][mr] of mr outputs (zeros
 * past O). dst holds floats floats (pfgdf_packed_floats of the level in use). Returns that level, -2 if
 * floats is not that size, -3 if the CPU lacks AVX2 + FMA. */
int pfgdf_pack_weights(const float *w, int64_t blocks, int64_t in, int64_t bo, float *dst, int64_t floats) {
  int level = pfgdf_isa();
  if (!level) return -3;
  if (floats != pfgdf_packed_floats(blocks, in, bo, level)) return -2;
  pfgdf_tiling tiling = pfgdf_tiling_of(level == 2);
  for (int64_t c = 0; c < blocks; ++c)
    for (int64_t k0 = 0; k0 < in; k0 += tiling.kc)
      for (int64_t o0 = 0; o0 < bo; o0 += tiling.mr)
        for (int64_t i = k0; i < in && i < k0 + tiling.kc; ++i)
          for (int64_t j = 0; j < tiling.mr; ++j) *dst++ = o0 + j < bo ? w[(c * in + i) * bo + o0 + j] : 0.0f;
  return level;
}

/* The product above. oidx NULL and m < 0: out is features-first [C*O, n]. Otherwise out is
 * batch-first [n, m]: out[r][k] = the product's row oidx[k] (oidx NULL: k itself, m == C*O), scattered
 * by the tiles' stores where the inner dimension is one piece and the result is small (SCATTER_MAX
 * floats), else by one pass over a features-first result, eight by eight in registers (stores a
 * random permutation apart miss the first-level cache: for 8 x 128 x 128 blocks the pass took 290 us
 * against 340 for the scattering stores at batch 64, 113 against 102 at batch 7, where it has no
 * whole groups of eight rows, and as much at batch 20). The input is x(s, r) = src[s * fs + r * rs]:
 * features first (rs == 1, fs == n), or batch first (fs == 1, rows rs apart), which is transposed to
 * features-first first, eight by eight: the packing then copies rows of 16 floats instead of fetching
 * each element (the first of three Linear(1024) layers at batch 64: 244 us against 273; a
 * Linear(4096): 4.24-4.40 ms against 4.35-4.54; equal at batch 2 and 7). Returns 0; -1 if out of
 * memory; -2 if oidx names a row twice or one outside [0, C*O) (nothing written); -3 if the CPU lacks
 * AVX2 + FMA; -4 if packed (the weights as pfgdf_pack_weights lays them out, packed_floats of them, for
 * instructions packed_isa; NULL: packed on the way, a piece at a time) is not the layout of this call. */
int pfgdf_block_gemm(const float *src, int64_t rows, int64_t n, int64_t fs, int64_t rs, const int64_t *idx,
                     const float *w, const float *b, int relu, float *out, int64_t blocks, int64_t in, int64_t bo,
                     const int64_t *oidx, int64_t m, const float *packed, int64_t packed_floats, int packed_isa) {
  if (!pfgdf_tuned()) return -3;
  int level = pfgdf_isa(), wide = level == 2;
  if (packed && (packed_isa != level || packed_floats != pfgdf_packed_floats(blocks, in, bo, level))) return -4;
  if (in < 1 || bo < 1) return 0; /* nothing to multiply (the caller never asks) */
  int64_t raw = blocks * bo, chunk, ncols;
  pfgdf_tiling tiling = pfgdf_tiling_of(wide);
  if (m >= 0 && !oidx && m != raw) return -2;
  int transpose = fs == 1; /* batch first: transposed once, so the packing copies rows */
  int scatter = m >= 0 && in <= tiling.kc && n * m <= SCATTER_MAX; /* batch first by the tiles' stores */
  size_t at[4], bytes = 0; /* offsets of pos, xt, tmp and the panels in the scratch, 64-byte aligned */
  size_t need[4] = {m >= 0 ? sizeof(int64_t) * (size_t)raw : 0, transpose ? sizeof(float) * (size_t)(rows * n) : 0,
                    m >= 0 && !scatter ? sizeof(float) * (size_t)(raw * n) : 0,
                    sizeof(float) * (size_t)pfgdf_blocking(n, in, bo, tiling.mr, tiling.nr, tiling.kc, &chunk, &ncols)};
  for (int k = 0; k < 4; ++k) at[k] = bytes, bytes += (need[k] + 63) / 64 * 64;
  void *owned, *base = pfgdf_scratch(bytes, &owned);
  if (!base) return -1;
  int64_t *pos = m >= 0 ? (int64_t *)((char *)base + at[0]) : NULL; /* each product row's position, or -1 */
  float *xt = (float *)((char *)base + at[1]), *tmp = (float *)((char *)base + at[2]);
  float *wpack = (float *)((char *)base + at[3]);
  int rc = 0;
  for (int64_t k = 0; pos && k < raw; ++k) pos[k] = oidx ? -1 : k;
  for (int64_t k = 0; pos && oidx && k < m; ++k) {
    if ((uint64_t)oidx[k] >= (uint64_t)raw || pos[oidx[k]] >= 0) {
      rc = -2;
      goto done;
    }
    pos[oidx[k]] = k;
  }
  if (transpose) {
    pfgdf_transpose(src, n, rows, rs, xt);
    src = xt, fs = n;
  }
  if (m < 0) {
    rc = pfgdf_block_gemm_isa(src, rows, n, fs, idx, w, b, relu, out, blocks, in, bo,
                              NULL, -1, wpack, packed, wide);
  } else if (scatter) {
    rc = pfgdf_block_gemm_isa(src, rows, n, fs, idx, w, b, relu, out, blocks, in, bo,
                              pos, m, wpack, packed, wide);
  } else { /* features first, then one pass back */
    rc = pfgdf_block_gemm_isa(src, rows, n, fs, idx, w, b, relu, tmp, blocks, in, bo,
                              NULL, -1, wpack, packed, wide);
    if (!rc) pfgdf_gather_rows_t(tmp, n, oidx, m, out);
  }
done:
  free(owned);
  return rc;
}

/* Batch 1, y [m]: y[k] = the product's row oidx[k] (zero for an entry outside [0, C*O)), through
 * max(0, .) if relu; oidx NULL: y is the whole [C*O] product. Returns 0; -1 if out of memory; -3 if
 * the CPU lacks AVX2 + FMA. */
int pfgdf_block_gemv(const float *x, const int64_t *idx, int64_t nfeat, const float *w, const float *b, int relu,
                     float *y, int64_t blocks, int64_t block_in, int64_t block_out, const int64_t *oidx, int64_t m) {
  if (!pfgdf_tuned()) return -3;
  int64_t raw = blocks * block_out;
  float *dst = oidx ? malloc(sizeof(float) * (size_t)(raw > 0 ? raw : 1)) : y;
  if (!dst) return -1;
  pfgdf_gemv_fma(x, idx, nfeat, w, b, dst, blocks, block_in, block_out);
  for (int64_t k = 0; relu && k < raw; ++k) dst[k] = dst[k] > 0.0f ? dst[k] : 0.0f;
  if (oidx) {
    for (int64_t k = 0; k < m; ++k) y[k] = (uint64_t)oidx[k] < (uint64_t)raw ? dst[oidx[k]] : 0.0f;
    free(dst);
  }
  return 0;
}

#else
/* Other compilers and CPUs: no kernels; pfgdf_plugin.native sees tuned() == 0 and never calls these. */
int pfgdf_tuned(void) { return 0; }

int pfgdf_isa(void) { return 0; }

int pfgdf_set_isa(int level) { return level == 1 || level == 2 ? 2 : -1; }

int64_t pfgdf_packed_floats(int64_t blocks, int64_t in, int64_t bo, int level) {
  (void)blocks, (void)in, (void)bo, (void)level;
  return 0;
}

int pfgdf_pack_weights(const float *w, int64_t blocks, int64_t in, int64_t bo, float *dst, int64_t floats) {
  (void)w, (void)blocks, (void)in, (void)bo, (void)dst, (void)floats;
  return -3;
}

int pfgdf_block_gemm(const float *src, int64_t rows, int64_t n, int64_t fs, int64_t rs, const int64_t *idx,
                     const float *w, const float *b, int relu, float *out, int64_t blocks, int64_t in, int64_t bo,
                     const int64_t *oidx, int64_t m, const float *packed, int64_t packed_floats, int packed_isa) {
  (void)packed, (void)packed_floats, (void)packed_isa;
  (void)src, (void)rows, (void)n, (void)fs, (void)rs, (void)idx, (void)w, (void)b, (void)relu, (void)out;
  (void)blocks, (void)in, (void)bo, (void)oidx, (void)m;
  return -3;
}

int pfgdf_block_gemv(const float *x, const int64_t *idx, int64_t nfeat, const float *w, const float *b, int relu,
                     float *y, int64_t blocks, int64_t block_in, int64_t block_out, const int64_t *oidx, int64_t m) {
  (void)x, (void)idx, (void)nfeat, (void)w, (void)b, (void)relu, (void)y, (void)blocks, (void)block_in;
  (void)block_out, (void)oidx, (void)m;
  return -3;
}
#endif
