/* The engine's CPU kernels: paged decode attention, rotary embedding, residual add + RMS norm,
 * SiLU(gate) * up, and the greedy argmax of a step's logits.
 *
 * Paged decode attention: one query token per row against its KV blocks, read in place. The torch
 * path gathers every row's blocks into a padded copy and hands it to SDPA, so each step writes and
 * re-reads all of the context; this kernel reads each visible key and value once. Given the rows'
 * rotary cos/sin it first rotates the query and the new key (what apply_rotary does in torch, with
 * transformers' rounding), then stores the row's new K and V, then attends one block of 16 tokens
 * at a time (online softmax), accumulating in float32 whatever the storage dtype. A task is a row
 * with all its kv heads, so a block's K (then V) rows are read front to back, which the hardware
 * prefetchers follow; with fewer rows than threads can share, a task is one (row, kv head). Tasks
 * touch disjoint cache slots, so they run in parallel.
 *
 * With AVX-512 (F, BW) and a head_dim that is a multiple of 32, a block is attended one kv head at a
 * time and each of its query heads scores the 16 tokens as one vector (WIDE_TASK; bfloat16 dot
 * products with AVX512_BF16 where the compiler targets it). Otherwise, with AVX2 + FMA and a head_dim
 * that is a multiple of 8, scores and values go 8 floats at a time; otherwise plain loops do the same
 * arithmetic. Which one is compiled follows the compiler's target (-march=native here).
 *
 * Rotary embedding, residual add + RMS norm, SiLU * up: between the layers' matrix products torch
 * runs these as several small ops, each with its own fixed cost (~80 us per norm at 768 floats) and
 * a pass over memory (the rotation: five, a roll and its copy among them); here each is one pass
 * per row (norm and SiLU 16 floats at a time with AVX-512).
 *
 * Greedy argmax: torch's max(dim=-1) over a step's logits takes ~0.7 ms at 16 x 32k on one core;
 * one pass in the logits' own dtype takes a tenth of that.
 *
 * Built on first use by cpu_kernels.py (cc -O3 -march=native -fopenmp) and called through ctypes.
 * OpenMP resolves to the libgomp that torch has already loaded (same soname), so the kernel shares
 * torch's thread pool instead of starting a second one that would fight it for the cores.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif
#if HAVE_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif
/* bfloat16 dot products two pairs per lane (exact products, float32 sums) */
#if HAVE_AVX512 && defined(__AVX512BF16__)
#define HAVE_AVX512_BF16 1
#else
#define HAVE_AVX512_BF16 0
#endif

#define BLOCK_SIZE 16
#define LANES 8
/* The AVX-512 path takes head dimensions that are a multiple of this (one vector of bfloat16). */
#define WIDE_DIMS 32
#define CACHE_LINE 64
/* Per-task scratch lives on the stack: two arrays of TASK_FLOATS floats (32 KiB). A task of one
 * (row, kv head) fits when group * head_dim does (MAX_GROUP, MAX_HEAD_DIM); a whole row, when all
 * its query heads do. */
#define MAX_HEAD_DIM 256
#define MAX_GROUP 16
#define TASK_FLOATS (MAX_GROUP * MAX_HEAD_DIM)
#define TASK_HEADS 64
/* Below this many (token, kv head) pairs a step runs on the calling thread: waking the pool costs
 * more than it saves (about 5 us of work per 1,000 pairs), and far more when the cores are busy. */
#define MIN_PARALLEL_WORK 4096
/* A task is a whole row when there are at least this many rows per thread (enough to balance). */
#define ROWS_PER_THREAD 2
/* Elements below which a norm or an activation stays on the calling thread. */
#define MIN_PARALLEL_ELEMENTS 65536

typedef uint16_t bf16_t;

/* ---- element conversions ------------------------------------------------------------------ */

static inline float f32_load(const float *p) { return *p; }
static inline void f32_store(float *p, float x) { *p = x; }

static inline float bf16_load(const bf16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void bf16_store(bf16_t *p, float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (isnan(f)) {
        *p = (bf16_t)((bits >> 16) | 0x40);  /* keep it a (quiet) NaN */
        return;
    }
    bits += 0x7fff + ((bits >> 16) & 1);  /* round to nearest even, as torch does */
    *p = (bf16_t)(bits >> 16);
}

static inline float f16_load(const _Float16 *p) { return (float)*p; }
static inline void f16_store(_Float16 *p, float x) { *p = (_Float16)x; }

/* exp(x) for x <= 0 (scores minus their running max). x = n ln2 + r with |r| <= ln2 / 2, and 2^r
 * by its Taylor series to degree 7: relative error about 1e-8, below float32's own rounding. */
#define EXP_CLAMP -87.0f /* exp(-87) ~ 1.6e-38, the order of the smallest normal float */
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693145751953125f /* ln 2 in two parts, so n * LN2_HI is exact */
#define LN2_LO 1.428606765330187e-06f
static const float EXP_TAYLOR[8] = {1.98412698e-4f, 1.38888889e-3f, 8.33333333e-3f, 4.16666667e-2f,
                                     1.66666667e-1f, 0.5f, 1.0f, 1.0f};

static inline float exp_nonpositive(float x) {
    x = x < EXP_CLAMP ? EXP_CLAMP : x;
    const float n = rintf(x * LOG2E);
    const float r = x - n * LN2_HI - n * LN2_LO;
    float p = EXP_TAYLOR[0];
    for (int i = 1; i < 8; i++) p = p * r + EXP_TAYLOR[i];
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

#if HAVE_AVX2
static inline __m256 f32_load8(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 bf16_load8(const bf16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline __m256 f16_load8(const _Float16 *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

static inline __m256 exp8_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_CLAMP));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_TAYLOR[0]);
    for (int i = 1; i < 8; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_TAYLOR[i]));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

/* Lane i of the result is the sum of the 8 lanes of a[i]. */
static inline __m256 lane_sums8(const __m256 a[LANES]) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

#if HAVE_AVX512
#define WIDE_LANES 16
static inline __m512 f32_load16(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 bf16_load16(const bf16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline __m512 f16_load16(const _Float16 *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* acc plus the products of 32 elements of q and k, two per lane. */
static inline __m512 f32_dot32(__m512 acc, const float *q, const float *k) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k), acc);
    return _mm512_fmadd_ps(_mm512_loadu_ps(q + WIDE_LANES), _mm512_loadu_ps(k + WIDE_LANES), acc);
}
static inline __m512 bf16_dot32(__m512 acc, const bf16_t *q, const bf16_t *k) {
#if HAVE_AVX512_BF16
    /* A product of two bfloat16 values is exact in float32, so this sums the same products as the
     * float32 path; it only flushes denormal inputs (below 1e-38) to zero. */
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q), (__m512bh)_mm512_loadu_si512(k));
#else
    acc = _mm512_fmadd_ps(bf16_load16(q), bf16_load16(k), acc);
    return _mm512_fmadd_ps(bf16_load16(q + WIDE_LANES), bf16_load16(k + WIDE_LANES), acc);
#endif
}
static inline __m512 f16_dot32(__m512 acc, const _Float16 *q, const _Float16 *k) {
    acc = _mm512_fmadd_ps(f16_load16(q), f16_load16(k), acc);
    return _mm512_fmadd_ps(f16_load16(q + WIDE_LANES), f16_load16(k + WIDE_LANES), acc);
}

/* exp8_nonpositive, 16 at a time. */
static inline __m512 exp16_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_CLAMP));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_TAYLOR[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_TAYLOR[i]));
    return _mm512_scalef_ps(p, n);
}

/* Lane t of the result is the sum of the 16 lanes of a[t]: four rounds, each adding pairs of
 * vectors' halves (256, 128, 64 then 32 bits wide) so that every lane keeps one token's sums. */
static inline __m512 lane_sums16(const __m512 a[WIDE_LANES]) {
    __m512 halves[8], quarters[4], eighths[2];
    /* halves[i]: tokens t, t + 4 (t = 0-3, 8-11), 8 sums each, in 256-bit halves */
    for (int i = 0; i < 8; i++) {
        const int t = i < 4 ? i : i + 4;
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[t], a[t + 4], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a[t], a[t + 4], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    /* quarters[t]: tokens t, t + 4, t + 8, t + 12, 4 sums each, in 128-bit quarters */
    for (int t = 0; t < 4; t++)
        quarters[t] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[t], halves[t + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(halves[t], halves[t + 4], _MM_SHUFFLE(3, 1, 3, 1)));
    /* eighths[i]: in each quarter, 2 sums each of tokens (t, t + 1) for t = 2i (+ 4, 8, 12) */
    for (int i = 0; i < 2; i++) {
        const __m512d x = _mm512_castps_pd(quarters[2 * i]), y = _mm512_castps_pd(quarters[2 * i + 1]);
        eighths[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(eighths[0], eighths[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

/* Asks for a span of the next block ahead of use: blocks sit anywhere in the cache, so the hardware
 * prefetchers cannot see the jump to the next one. Into L2 (locality 2, prefetcht1): a block's
 * 16 KB would crowd out the L1 the current block is read from (8% faster decode attention in bf16
 * than prefetcht0 on a Zen 4 core). */
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 2
#endif
static inline void prefetch_span(const char *start, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += CACHE_LINE)
        __builtin_prefetch(start + offset, 0, PREFETCH_LOCALITY);
}

/* The AVX-512 task asks for the block this many ahead of the one it attends, a share of its cache
 * lines before each query head's work: a whole block's 256 lines asked for at once fill the core's
 * queue of misses, and the arithmetic waits behind them until they drain, so reading and computing
 * added up instead of overlapping (spread out: 25% less time in bf16 on a Xeon core; one, two or
 * three blocks ahead within 5% of each other, one the best). */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 1
#endif
/* Lines [from, to) of a block's K span then its V span (`lines` lines each). */
static inline void prefetch_lines(const char *k, const char *v, int64_t lines, int64_t from, int64_t to) {
    for (int64_t i = from; i < to && i < 2 * lines; i++)
        __builtin_prefetch(i < lines ? k + i * CACHE_LINE : v + (i - lines) * CACHE_LINE, 0, PREFETCH_LOCALITY);
}

/* ---- the kernel, once per storage dtype ----------------------------------------------------
 * Arguments are element counts (not bytes) for strides and offsets:
 *   q[row * q_row_stride + head * head_dim + d]
 *   new K of kv head h: new_kv[row * new_kv_row_stride + h * head_dim + d], its V at
 *   (num_kv_heads + h) * head_dim; new_kv NULL: nothing to store
 *   cos[row * head_dim + d], sin likewise (the signed sin of rope.py: first half negated); NULL: q
 *   and the new K are already rotated
 *   K of token t (within its block) of kv head h in block b:
 *       kv[b * block_stride + k_offset + t * token_stride + h * head_dim + d]   (V: v_offset)
 *   out[row * num_heads * head_dim + head * head_dim + d]
 * A row's new token sits at position ctx - 1; the row sees positions [max(0, ctx - window), ctx)
 * (window 0: no window); ctx 0 gives zeros. The task body is inlined with head_dim a constant for
 * the common sizes, so its loops unroll into whole vectors. */
#define DEFINE_PAGED_DECODE(NAME, T, LOAD, LOAD8, STORE, LOAD16, DOT32)                               \
    /* Scores of tokens [lo, hi) of one block for query head g (scaled q in qs[g]). */                \
    static inline __attribute__((always_inline)) void NAME##_scores(                                  \
        const float *qg, const T *keys, int64_t token_stride, int64_t head_dim, int64_t lo,           \
        int64_t hi, float *scores) {                                                                  \
        int64_t t = lo;                                                                               \
        if (HAVE_AVX2 && head_dim % LANES == 0) {                                                     \
            VECTOR_SCORES(T, LOAD8)                                                                   \
        }                                                                                             \
        for (; t < hi; t++) {                                                                         \
            const T *key = keys + t * token_stride;                                                   \
            float s = 0.0f;                                                                           \
            for (int64_t d = 0; d < head_dim; d++) s += qg[d] * LOAD(key + d);                        \
            scores[t] = s;                                                                            \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* acc += sum over tokens [lo, hi) of probs[t] * V[t]. */                                         \
    static inline __attribute__((always_inline)) void NAME##_values(                                  \
        const float *probs, const T *values, int64_t token_stride, int64_t head_dim, int64_t lo,      \
        int64_t hi, float *acc) {                                                                     \
        if (HAVE_AVX2 && head_dim % LANES == 0) {                                                     \
            VECTOR_VALUES(T, LOAD8)                                                                   \
            return;                                                                                   \
        }                                                                                             \
        for (int64_t t = lo; t < hi; t++) {                                                           \
            const T *value = values + t * token_stride;                                               \
            for (int64_t d = 0; d < head_dim; d++) acc[d] += probs[t] * LOAD(value + d);              \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Element d of x rotated by the row's angles, rounded as transformers rounds                     \
     * x * cos + rotate_half(x) * sin: each product and the sum in the storage dtype. */             \
    static inline __attribute__((always_inline)) float NAME##_rotated(                                \
        const T *x, const T *cos, const T *sin, int64_t head_dim, int64_t d) {                        \
        const int64_t half = head_dim / 2;                                                            \
        T straight, turned, sum;                                                                      \
        STORE(&straight, LOAD(x + d) * LOAD(cos + d));                                                \
        STORE(&turned, LOAD(x + (d < half ? d + half : d - half)) * LOAD(sin + d));                   \
        STORE(&sum, LOAD(&straight) + LOAD(&turned));                                                 \
        return LOAD(&sum);                                                                            \
    }                                                                                                 \
                                                                                                      \
    /* The AVX-512 task (WIDE_TASK); q, out: the task's first query head, cos/sin: the row's. */      \
    static inline __attribute__((always_inline)) void NAME##_task_wide(                               \
        const T *q, const T *cos, const T *sin, const T *kv, const int32_t *table,                    \
        int64_t block_stride, int64_t k_offset, int64_t v_offset, int64_t token_stride, int64_t group, \
        const int64_t head_dim, int64_t ctx, int64_t sliding_window, float scale, int64_t kv_heads,   \
        T *out, const T *next_first) {                                                                \
        WIDE_TASK(NAME, T, LOAD, STORE, LOAD16, DOT32)                                                \
    }                                                                                                 \
                                                                                                      \
    /* Row `row` with the query heads of kv heads [h0, h1). Within a block the loop runs over the     \
     * heads, so the block's K and V rows of those heads are read in address order. `next_row`: the   \
     * row this thread attends next (its first block is asked for during this row's last; -1: none). */ \
    static inline __attribute__((always_inline)) void NAME##_task(                                    \
        const T *q, int64_t q_row_stride, const T *new_kv, int64_t new_kv_row_stride,                 \
        const T *cos, const T *sin, T *kv, int64_t block_stride, int64_t k_offset, int64_t v_offset,  \
        int64_t token_stride, const int32_t *block_tables, int64_t table_stride,                      \
        const int32_t *context_lens, int64_t num_heads, int64_t num_kv_heads, const int64_t head_dim, \
        int64_t sliding_window, float scale, T *out, int64_t row, int64_t h0, int64_t h1,             \
        int64_t next_row) {                                                                           \
        const int64_t group = num_heads / num_kv_heads;                                              \
        const int64_t ctx = context_lens[row];                                                        \
        const int32_t *table = block_tables + row * table_stride;                                     \
        const T *row_cos = cos == NULL ? NULL : cos + row * head_dim;                                 \
        const T *row_sin = sin == NULL ? NULL : sin + row * head_dim;                                 \
        if (new_kv != NULL && ctx > 0) {                                                              \
            T *slot = kv + table[(ctx - 1) / BLOCK_SIZE] * block_stride +                             \
                      ((ctx - 1) % BLOCK_SIZE) * token_stride;                                        \
            for (int64_t h = h0; h < h1; h++) {                                                       \
                const T *fresh = new_kv + row * new_kv_row_stride + h * head_dim;                     \
                T *key = slot + k_offset + h * head_dim;                                              \
                if (row_cos == NULL) {                                                                \
                    memcpy(key, fresh, head_dim * sizeof(T));                                         \
                } else {                                                                              \
                    for (int64_t d = 0; d < head_dim; d++)                                            \
                        STORE(key + d, NAME##_rotated(fresh, row_cos, row_sin, head_dim, d));         \
                }                                                                                     \
                memcpy(slot + v_offset + h * head_dim, fresh + num_kv_heads * head_dim,               \
                       head_dim * sizeof(T));                                                         \
            }                                                                                         \
        }                                                                                             \
        if (HAVE_AVX512 && head_dim % WIDE_DIMS == 0) {                                               \
            const T *next_first = NULL;                                                               \
            if (next_row >= 0 && context_lens[next_row] > 0) {                                        \
                const int64_t next_ctx = context_lens[next_row];                                      \
                const int64_t next_start =                                                            \
                    sliding_window > 0 && next_ctx > sliding_window ? next_ctx - sliding_window : 0;  \
                next_first = kv + block_tables[next_row * table_stride + next_start / BLOCK_SIZE] * block_stride + h0 * head_dim; \
            }                                                                                         \
            NAME##_task_wide(q + row * q_row_stride + h0 * group * head_dim, row_cos, row_sin,        \
                             kv + h0 * head_dim, table, block_stride, k_offset, v_offset, token_stride, \
                             group, head_dim, ctx, sliding_window, scale, h1 - h0,                    \
                             out + (row * num_heads + h0 * group) * head_dim, next_first);            \
            return;                                                                                   \
        }                                                                                             \
        const int64_t heads = (h1 - h0) * group;                                                      \
        float qs[TASK_FLOATS], acc[TASK_FLOATS], run_max[TASK_HEADS], run_sum[TASK_HEADS];            \
        float probs[BLOCK_SIZE];                                                                      \
        for (int64_t g = 0; g < heads; g++) {                                                         \
            const T *qh = q + row * q_row_stride + (h0 * group + g) * head_dim;                       \
            for (int64_t d = 0; d < head_dim; d++)                                                    \
                qs[g * head_dim + d] = (row_cos == NULL ? LOAD(qh + d)                                \
                                        : NAME##_rotated(qh, row_cos, row_sin, head_dim, d)) * scale; \
            for (int64_t d = 0; d < head_dim; d++) acc[g * head_dim + d] = 0.0f;                      \
            run_max[g] = -INFINITY;                                                                   \
            run_sum[g] = 0.0f;                                                                        \
        }                                                                                             \
        /* The heads' rows of a block, from the first head's first row to the last head's last. */    \
        const int64_t span_bytes = ((BLOCK_SIZE - 1) * token_stride + (h1 - h0) * head_dim) * sizeof(T); \
        const int64_t first = sliding_window > 0 && ctx > sliding_window ? ctx - sliding_window : 0;  \
        for (int64_t start = first - first % BLOCK_SIZE; start < ctx; start += BLOCK_SIZE) {         \
            const int64_t lo = first > start ? first - start : 0;                                     \
            const int64_t hi = ctx - start < BLOCK_SIZE ? ctx - start : BLOCK_SIZE;                   \
            const T *block = kv + table[start / BLOCK_SIZE] * block_stride + h0 * head_dim;           \
            if (start + BLOCK_SIZE < ctx) {                                                           \
                const T *next = kv + table[start / BLOCK_SIZE + 1] * block_stride + h0 * head_dim;    \
                prefetch_span((const char *)(next + k_offset), span_bytes);                           \
                prefetch_span((const char *)(next + v_offset), span_bytes);                           \
            }                                                                                         \
            for (int64_t g = 0; g < heads; g++) {                                                     \
                const T *head = block + (g / group) * head_dim;                                       \
                NAME##_scores(qs + g * head_dim, head + k_offset, token_stride, head_dim, lo, hi, probs);         \
                float block_max = -INFINITY;                                                          \
                for (int64_t t = lo; t < hi; t++) block_max = probs[t] > block_max ? probs[t] : block_max;        \
                if (block_max > run_max[g]) {                                                         \
                    const float rescale = exp_nonpositive(run_max[g] - block_max);                    \
                    run_sum[g] *= rescale;                                                            \
                    for (int64_t d = 0; d < head_dim; d++) acc[g * head_dim + d] *= rescale;                      \
                    run_max[g] = block_max;                                                           \
                }                                                                                     \
                for (int64_t t = lo; t < hi; t++) {                                                   \
                    probs[t] = exp_nonpositive(probs[t] - run_max[g]);                                \
                    run_sum[g] += probs[t];                                                           \
                }                                                                                     \
                NAME##_values(probs, head + v_offset, token_stride, head_dim, lo, hi, acc + g * head_dim);        \
            }                                                                                         \
        }                                                                                             \
        for (int64_t g = 0; g < heads; g++) {                                                         \
            T *o = out + (row * num_heads + h0 * group + g) * head_dim;                               \
            const float inv = run_sum[g] > 0.0f ? 1.0f / run_sum[g] : 0.0f;                           \
            for (int64_t d = 0; d < head_dim; d++) STORE(o + d, acc[g * head_dim + d] * inv);                     \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    void NAME(const T *q, int64_t q_row_stride, const T *new_kv, int64_t new_kv_row_stride,           \
              const T *cos, const T *sin, T *kv, int64_t block_stride, int64_t k_offset,              \
              int64_t v_offset, int64_t token_stride, const int32_t *block_tables,                    \
              int64_t table_stride, const int32_t *context_lens, int64_t num_rows, int64_t num_heads, \
              int64_t num_kv_heads, int64_t head_dim, int64_t sliding_window, float scale, T *out,    \
              int32_t num_threads) {                                                                  \
        int64_t work = 0;                                                                             \
        for (int64_t row = 0; row < num_rows; row++) work += context_lens[row] * num_kv_heads;       \
        const int parallel = num_threads > 1 && work >= MIN_PARALLEL_WORK;                            \
        const int whole_rows = num_heads <= TASK_HEADS && num_heads * head_dim <= TASK_FLOATS &&      \
                               !(parallel && num_rows < ROWS_PER_THREAD * num_threads);               \
        const int64_t split = whole_rows ? 1 : num_kv_heads;                                          \
        const int64_t tasks = num_rows * split;                                                       \
        /* Last task first: the runner orders rows by context length, so the longest start first. */ \
        _Pragma("omp parallel for schedule(dynamic) num_threads(num_threads) if(parallel)")          \
        for (int64_t i = 0; i < tasks; i++) {                                                         \
            const int64_t task = tasks - 1 - i, row = task / split;                                   \
            const int64_t h0 = split == 1 ? 0 : task % split, h1 = split == 1 ? num_kv_heads : h0 + 1; \
            /* On one thread the tasks run in this order: the next row is known. */                   \
            const int64_t next_row = split == 1 && !parallel && row > 0 ? row - 1 : -1;              \
            switch (head_dim) {                                                                       \
            case 64:                                                                                  \
                NAME##_task(q, q_row_stride, new_kv, new_kv_row_stride, cos, sin, kv, block_stride,   \
                            k_offset, v_offset, token_stride, block_tables, table_stride,             \
                            context_lens, num_heads, num_kv_heads, 64, sliding_window, scale, out,    \
                            row, h0, h1, next_row);                                                   \
                break;                                                                                \
            case 128:                                                                                 \
                NAME##_task(q, q_row_stride, new_kv, new_kv_row_stride, cos, sin, kv, block_stride,   \
                            k_offset, v_offset, token_stride, block_tables, table_stride,             \
                            context_lens, num_heads, num_kv_heads, 128, sliding_window, scale, out,   \
                            row, h0, h1, next_row);                                                   \
                break;                                                                                \
            default:                                                                                  \
                NAME##_task(q, q_row_stride, new_kv, new_kv_row_stride, cos, sin, kv, block_stride,   \
                            k_offset, v_offset, token_stride, block_tables, table_stride,             \
                            context_lens, num_heads, num_kv_heads, head_dim, sliding_window, scale,   \
                            out, row, h0, h1, next_row);                                              \
            }                                                                                         \
        }                                                                                             \
    }

#if HAVE_AVX2
/* Scores 8 tokens at a time: each token's dot product accumulates in its own vector (8 independent
 * chains), and one transpose-and-add turns the 8 vectors into the 8 scores. */
#define VECTOR_SCORES(T, LOAD8)                                                                       \
    for (; t + LANES <= hi; t += LANES) {                                                             \
        __m256 sums[LANES];                                                                           \
        for (int i = 0; i < LANES; i++) sums[i] = _mm256_setzero_ps();                                \
        for (int64_t d = 0; d < head_dim; d += LANES) {                                               \
            const __m256 qd = _mm256_loadu_ps(qg + d);                                                \
            for (int i = 0; i < LANES; i++)                                                           \
                sums[i] = _mm256_fmadd_ps(qd, LOAD8(keys + (t + i) * token_stride + d), sums[i]);     \
        }                                                                                             \
        _mm256_storeu_ps(scores + t, lane_sums8(sums));                                               \
    }
/* The accumulator stays in registers across the block's tokens, up to 64 floats at a time. */
#define VALUE_VECTORS 8
#define VECTOR_VALUES(T, LOAD8)                                                                       \
    for (int64_t d0 = 0; d0 < head_dim; d0 += VALUE_VECTORS * LANES) {                                \
        const int64_t width = head_dim - d0 < VALUE_VECTORS * LANES ? head_dim - d0 : VALUE_VECTORS * LANES; \
        __m256 sums[VALUE_VECTORS];                                                                   \
        for (int j = 0; j * LANES < width; j++) sums[j] = _mm256_loadu_ps(acc + d0 + j * LANES);      \
        for (int64_t t = lo; t < hi; t++) {                                                           \
            const __m256 p = _mm256_set1_ps(probs[t]);                                                \
            const T *value = values + t * token_stride + d0;                                          \
            for (int j = 0; j * LANES < width; j++)                                                   \
                sums[j] = _mm256_fmadd_ps(p, LOAD8(value + j * LANES), sums[j]);                      \
        }                                                                                             \
        for (int j = 0; j * LANES < width; j++) _mm256_storeu_ps(acc + d0 + j * LANES, sums[j]);      \
    }
#else
#define VECTOR_SCORES(T, LOAD8)
#define VECTOR_VALUES(T, LOAD8)
#endif

#if HAVE_AVX512
/* A task attends each block one kv head at a time: the block's values of that head converted to
 * float32 once (bfloat16, float16), then for each of its query heads the 16 tokens' scores as one
 * vector (a vector of partial dot products per token, then lane_sums16), the online softmax on that
 * vector, and the weighted values. The scores are the dot products of q and K as stored (rotated and
 * rounded q, times the scale after the sum, as the reference does). */
#define WIDE_TASK(NAME, T, LOAD, STORE, LOAD16, DOT32)                                                \
    const int64_t heads = kv_heads * group;                                                           \
    T qs[TASK_FLOATS];                                                                                \
    float acc[TASK_FLOATS], run_max[TASK_HEADS], run_sum[TASK_HEADS], probs[BLOCK_SIZE];              \
    float block_values[BLOCK_SIZE * MAX_HEAD_DIM];                                                    \
    for (int64_t g = 0; g < heads; g++) {                                                             \
        for (int64_t d = 0; d < head_dim; d++)                                                        \
            STORE(qs + g * head_dim + d, cos == NULL ? LOAD(q + g * head_dim + d)                     \
                                                     : NAME##_rotated(q + g * head_dim, cos, sin, head_dim, d)); \
        for (int64_t d = 0; d < head_dim; d++) acc[g * head_dim + d] = 0.0f;                          \
        run_max[g] = -INFINITY;                                                                       \
        run_sum[g] = 0.0f;                                                                            \
    }                                                                                                 \
    const int64_t span_bytes = ((BLOCK_SIZE - 1) * token_stride + kv_heads * head_dim) * sizeof(T);   \
    const int64_t span_lines = (span_bytes + CACHE_LINE - 1) / CACHE_LINE;                            \
    const int64_t share = (2 * span_lines + heads - 1) / heads; /* lines asked for per query head */  \
    const int64_t first = sliding_window > 0 && ctx > sliding_window ? ctx - sliding_window : 0;      \
    const int64_t first_block = first / BLOCK_SIZE, blocks = (ctx + BLOCK_SIZE - 1) / BLOCK_SIZE;     \
    /* The first blocks, all at once: nothing to overlap them with yet. */                            \
    for (int64_t b = first_block + 1; b < blocks && b < first_block + PREFETCH_BLOCKS; b++) {         \
        const T *ahead = kv + table[b] * block_stride;                                                \
        prefetch_span((const char *)(ahead + k_offset), span_bytes);                                  \
        prefetch_span((const char *)(ahead + v_offset), span_bytes);                                  \
    }                                                                                                 \
    for (int64_t start = first - first % BLOCK_SIZE; start < ctx; start += BLOCK_SIZE) {              \
        const int64_t lo = first > start ? first - start : 0;                                         \
        const int64_t hi = ctx - start < BLOCK_SIZE ? ctx - start : BLOCK_SIZE;                       \
        const __mmask16 visible = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));                  \
        const T *block = kv + table[start / BLOCK_SIZE] * block_stride;                               \
        const int64_t ahead_block = start / BLOCK_SIZE + PREFETCH_BLOCKS;                             \
        const char *ahead_k = NULL, *ahead_v = NULL;                                                  \
        if (ahead_block < blocks) {                                                                   \
            const T *ahead = kv + table[ahead_block] * block_stride;                                  \
            ahead_k = (const char *)(ahead + k_offset);                                               \
            ahead_v = (const char *)(ahead + v_offset);                                               \
        } else if (next_first != NULL) { /* the row's last block: the next row's first */              \
            ahead_k = (const char *)(next_first + k_offset);                                          \
            ahead_v = (const char *)(next_first + v_offset);                                          \
        }                                                                                             \
        int64_t asked = 0;                                                                            \
        for (int64_t h = 0; h < kv_heads; h++) {                                                      \
            const T *keys = block + k_offset + h * head_dim;                                          \
            /* The block's values as float32, converted once for the kv head's query heads. */        \
            const float *values = (const float *)(block + v_offset + h * head_dim);                   \
            int64_t value_stride = token_stride;                                                      \
            if (sizeof(T) != sizeof(float)) {                                                         \
                for (int64_t t = lo; t < hi; t++)                                                     \
                    for (int64_t d = 0; d < head_dim; d += WIDE_LANES)                                \
                        _mm512_storeu_ps(block_values + t * head_dim + d,                             \
                                         LOAD16(block + v_offset + t * token_stride + h * head_dim + d)); \
                values = block_values;                                                                \
                value_stride = head_dim;                                                              \
            }                                                                                         \
            for (int64_t g = h * group; g < (h + 1) * group; g++) {                                   \
                if (ahead_k != NULL) prefetch_lines(ahead_k, ahead_v, span_lines, asked, asked + share);  \
                asked += share;                                                                       \
                /* Every token's score, hidden ones included (they stay in their own lane). */        \
                __m512 partial[BLOCK_SIZE];                                                           \
                for (int t = 0; t < BLOCK_SIZE; t++) {                                                \
                    partial[t] = _mm512_setzero_ps();                                                 \
                    for (int64_t d = 0; d < head_dim; d += WIDE_DIMS)                                 \
                        partial[t] = DOT32(partial[t], qs + g * head_dim + d, keys + t * token_stride + d); \
                }                                                                                     \
                const __m512 scores = _mm512_mul_ps(lane_sums16(partial), _mm512_set1_ps(scale));     \
                const float block_max = _mm512_mask_reduce_max_ps(visible, scores);                   \
                if (block_max > run_max[g]) {                                                         \
                    const float rescale = exp_nonpositive(run_max[g] - block_max);                    \
                    run_sum[g] *= rescale;                                                            \
                    for (int64_t d = 0; d < head_dim; d++) acc[g * head_dim + d] *= rescale;          \
                    run_max[g] = block_max;                                                           \
                }                                                                                     \
                const __m512 p = _mm512_maskz_mov_ps(                                                 \
                    visible, exp16_nonpositive(_mm512_sub_ps(scores, _mm512_set1_ps(run_max[g]))));   \
                run_sum[g] += _mm512_reduce_add_ps(p);                                                \
                _mm512_storeu_ps(probs, p);                                                           \
                WIDE_VALUES(acc + g * head_dim)                                                       \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    for (int64_t g = 0; g < heads; g++) {                                                             \
        const float inv = run_sum[g] > 0.0f ? 1.0f / run_sum[g] : 0.0f;                               \
        for (int64_t d = 0; d < head_dim; d++) STORE(out + g * head_dim + d, acc[g * head_dim + d] * inv); \
    }
/* acc += sum over tokens [lo, hi) of probs[t] * values[t], up to 128 floats in registers at a time. */
#define WIDE_VALUES(ACC)                                                                              \
    for (int64_t d0 = 0; d0 < head_dim; d0 += VALUE_VECTORS * WIDE_LANES) {                           \
        const int64_t width = head_dim - d0 < VALUE_VECTORS * WIDE_LANES ? head_dim - d0 : VALUE_VECTORS * WIDE_LANES; \
        __m512 sums[VALUE_VECTORS];                                                                   \
        for (int j = 0; j * WIDE_LANES < width; j++) sums[j] = _mm512_loadu_ps((ACC) + d0 + j * WIDE_LANES); \
        for (int64_t t = lo; t < hi; t++) {                                                           \
            const __m512 pt = _mm512_set1_ps(probs[t]);                                               \
            const float *value = values + t * value_stride + d0;                                      \
            for (int j = 0; j * WIDE_LANES < width; j++)                                              \
                sums[j] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(value + j * WIDE_LANES), sums[j]);      \
        }                                                                                             \
        for (int j = 0; j * WIDE_LANES < width; j++) _mm512_storeu_ps((ACC) + d0 + j * WIDE_LANES, sums[j]); \
    }
#else
#define WIDE_TASK(NAME, T, LOAD, STORE, LOAD16, DOT32)
#endif

DEFINE_PAGED_DECODE(paged_decode_f32, float, f32_load, f32_load8, f32_store, f32_load16, f32_dot32)
DEFINE_PAGED_DECODE(paged_decode_bf16, bf16_t, bf16_load, bf16_load8, bf16_store, bf16_load16, bf16_dot32)
DEFINE_PAGED_DECODE(paged_decode_f16, _Float16, f16_load, f16_load8, f16_store, f16_load16, f16_dot32)

/* ---- rotary embedding, in place ----------------------------------------------------------
 * Rotates the query heads q[row * q_row_stride + head * head_dim + d] (q_heads of them) and the key
 * heads k[row * k_row_stride + ...] (k_heads) of each row by the row's angles cos/sin[row * head_dim
 * + d] (the signed sin of rope.py), rounded as the decode kernel (and transformers) rounds. Each
 * head is copied first: its rotated halves are made of both original halves. */
#define DEFINE_ROTARY(NAME, T, DECODE, STORE)                                                         \
    void NAME(T *q, int64_t q_row_stride, int64_t q_heads, T *k, int64_t k_row_stride, int64_t k_heads, \
              const T *cos, const T *sin, int64_t rows, int64_t head_dim, int32_t num_threads) {      \
        _Pragma("omp parallel for num_threads(num_threads) if(num_threads > 1 && rows * (q_heads + k_heads) * head_dim >= MIN_PARALLEL_ELEMENTS)") \
        for (int64_t row = 0; row < rows; row++) {                                                    \
            const T *row_cos = cos + row * head_dim, *row_sin = sin + row * head_dim;                 \
            T original[MAX_HEAD_DIM];                                                                 \
            for (int64_t h = 0; h < q_heads + k_heads; h++) {                                         \
                T *x = h < q_heads ? q + row * q_row_stride + h * head_dim                            \
                                   : k + row * k_row_stride + (h - q_heads) * head_dim;               \
                memcpy(original, x, head_dim * sizeof(T));                                            \
                for (int64_t d = 0; d < head_dim; d++)                                                \
                    STORE(x + d, DECODE##_rotated(original, row_cos, row_sin, head_dim, d));          \
            }                                                                                         \
        }                                                                                             \
    }

DEFINE_ROTARY(rotary_f32, float, paged_decode_f32, f32_store)
DEFINE_ROTARY(rotary_bf16, bf16_t, paged_decode_bf16, bf16_store)
DEFINE_ROTARY(rotary_f16, _Float16, paged_decode_f16, f16_store)

/* ---- residual add + RMS norm, SiLU(gate) * up: rows of 16 floats at a time --------------------
 * With AVX-512 a row goes 16 elements at a time and its rest (dim % 16) one at a time; the vector
 * steps round to the storage dtype exactly as the scalar stores do (round to nearest even, NaN kept
 * quiet; bfloat16 by the same integer arithmetic, so denormals are kept rather than flushed as the
 * bf16 conversion instruction would). Without AVX-512 the whole row takes the scalar loop. */
#if HAVE_AVX512
/* x rounded to the storage dtype, as float32 again */
static inline __m512 f32_round16(__m512 x) { return x; }
static inline __m512 bf16_round16(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    rounded = _mm512_mask_or_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), bits,
                                   _mm512_set1_epi32(0x400000));  /* NaN: quiet, not rounded */
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u)));
}
static inline __m512 f16_round16(__m512 x) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
/* 16 floats already rounded to the storage dtype (x_round16), stored */
static inline void f32_store16(float *p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline void bf16_store16(bf16_t *p, __m512 rounded) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}
static inline void f16_store16(_Float16 *p, __m512 rounded) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(rounded, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* silu(x) = x / (1 + exp(-x)), 16 at a time, as the scalar silu computes it */
static inline __m512 silu16(__m512 x) {
    const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 negated = _mm512_sub_ps(_mm512_setzero_ps(), x);
    const __m512 e = exp16_nonpositive(_mm512_mask_blend_ps(positive, x, negated));
    const __m512 numerator = _mm512_mask_blend_ps(positive, _mm512_mul_ps(x, e), x);
    return _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* The vector part of a norm row: residual += x over [0, dim - dim % 16), the sum of the squares. */
#define WIDE_NORM_SQUARES(T, LOAD16, ROUND16, STORE16)                                                \
    __m512 sums = _mm512_setzero_ps();                                                                \
    for (; d + WIDE_LANES <= dim; d += WIDE_LANES) {                                                  \
        __m512 value = LOAD16(r + d);                                                                 \
        if (x != NULL) {                                                                              \
            value = ROUND16(_mm512_add_ps(value, LOAD16(x + row * dim + d)));                         \
            STORE16(r + d, value);                                                                    \
        }                                                                                             \
        sums = _mm512_add_ps(sums, _mm512_mul_ps(value, value)); /* rounded, then summed, as torch */ \
    }                                                                                                 \
    squares = _mm512_reduce_add_ps(sums);
/* The vector part of the normalisation: out = dtype(weight * dtype(residual * inverse_rms)). */
#define WIDE_NORM_OUT(T, LOAD16, ROUND16, STORE16)                                                    \
    for (; d + WIDE_LANES <= dim; d += WIDE_LANES) {                                                  \
        const __m512 normed = ROUND16(_mm512_mul_ps(LOAD16(r + d), _mm512_set1_ps(inverse_rms)));     \
        STORE16(o + d, ROUND16(_mm512_mul_ps(LOAD16(weight + d), normed)));                           \
    }
/* The vector part of a SiLU row: out = dtype(dtype(silu(gate)) * up). */
#define WIDE_SILU_MUL(T, LOAD16, ROUND16, STORE16)                                                    \
    for (; i + WIDE_LANES <= inter; i += WIDE_LANES) {                                                \
        const __m512 activated = ROUND16(silu16(LOAD16(gate + i)));                                   \
        STORE16(o + i, ROUND16(_mm512_mul_ps(activated, LOAD16(up + i))));                            \
    }
#else
#define WIDE_NORM_SQUARES(T, LOAD16, ROUND16, STORE16)
#define WIDE_NORM_OUT(T, LOAD16, ROUND16, STORE16)
#define WIDE_SILU_MUL(T, LOAD16, ROUND16, STORE16)
#endif

/* ---- residual add + RMS norm -------------------------------------------------------------
 * Per row of `dim` elements: residual += x (x NULL: no add), then
 *   out = weight * dtype(residual * 1 / sqrt(mean(residual^2) + eps))
 * in float32 and rounded to the storage dtype where transformers' RMSNorm rounds: the normalised
 * row before the weight multiplies it, and the product. */
#define DEFINE_ADD_RMS_NORM(NAME, T, LOAD, STORE, LOAD16, ROUND16, STORE16)                           \
    void NAME(T *residual, const T *x, const T *weight, T *out, int64_t rows, int64_t dim, float eps, \
              int32_t num_threads) {                                                                  \
        _Pragma("omp parallel for num_threads(num_threads) if(num_threads > 1 && rows * dim >= MIN_PARALLEL_ELEMENTS)") \
        for (int64_t row = 0; row < rows; row++) {                                                    \
            T *r = residual + row * dim;                                                              \
            T *o = out + row * dim;                                                                   \
            float squares = 0.0f;                                                                     \
            int64_t d = 0;                                                                            \
            WIDE_NORM_SQUARES(T, LOAD16, ROUND16, STORE16)                                            \
            for (; d < dim; d++) {                                                                    \
                float value = LOAD(r + d);                                                            \
                if (x != NULL) {                                                                      \
                    STORE(r + d, value + LOAD(x + row * dim + d));                                    \
                    value = LOAD(r + d);                                                              \
                }                                                                                     \
                squares += value * value;                                                             \
            }                                                                                         \
            const float inverse_rms = 1.0f / sqrtf(squares / (float)dim + eps);                       \
            d = 0;                                                                                    \
            WIDE_NORM_OUT(T, LOAD16, ROUND16, STORE16)                                                \
            for (; d < dim; d++) {                                                                    \
                T normed;                                                                             \
                STORE(&normed, LOAD(r + d) * inverse_rms);                                            \
                STORE(o + d, LOAD(weight + d) * LOAD(&normed));                                       \
            }                                                                                         \
        }                                                                                             \
    }

/* ---- SiLU(gate) * up ----------------------------------------------------------------------
 * Per row of the fused gate_up product (gate: the first `inter` values, up: the next `inter`):
 *   out = dtype(dtype(silu(gate)) * up), silu(x) = x / (1 + exp(-x)), as torch rounds them. */
static inline float silu(float x) {
    /* exp(-x) = exp(-|x|) or its inverse, so the exp stays in exp_nonpositive's range. */
    const float e = exp_nonpositive(x > 0.0f ? -x : x);
    return x > 0.0f ? x / (1.0f + e) : x * e / (1.0f + e);
}

#define DEFINE_SILU_MUL(NAME, T, LOAD, STORE, LOAD16, ROUND16, STORE16)                               \
    void NAME(const T *gate_up, int64_t row_stride, T *out, int64_t rows, int64_t inter,            \
              int32_t num_threads) {                                                                  \
        _Pragma("omp parallel for num_threads(num_threads) if(num_threads > 1 && rows * inter >= MIN_PARALLEL_ELEMENTS)") \
        for (int64_t row = 0; row < rows; row++) {                                                    \
            const T *gate = gate_up + row * row_stride, *up = gate + inter;                           \
            T *o = out + row * inter;                                                                 \
            int64_t i = 0;                                                                            \
            WIDE_SILU_MUL(T, LOAD16, ROUND16, STORE16)                                                \
            for (; i < inter; i++) {                                                                  \
                T activated;                                                                          \
                STORE(&activated, silu(LOAD(gate + i)));                                              \
                STORE(o + i, LOAD(&activated) * LOAD(up + i));                                        \
            }                                                                                         \
        }                                                                                             \
    }

#define ELEMENTWISE_KERNELS(SUFFIX, T)                                                                \
    DEFINE_SILU_MUL(silu_mul_##SUFFIX, T, SUFFIX##_load, SUFFIX##_store, SUFFIX##_load16,             \
                    SUFFIX##_round16, SUFFIX##_store16)                                               \
    DEFINE_ADD_RMS_NORM(add_rms_norm_##SUFFIX, T, SUFFIX##_load, SUFFIX##_store, SUFFIX##_load16,     \
                        SUFFIX##_round16, SUFFIX##_store16)
ELEMENTWISE_KERNELS(f32, float)
ELEMENTWISE_KERNELS(bf16, bf16_t)
ELEMENTWISE_KERNELS(f16, _Float16)

int64_t paged_decode_max_head_dim(void) { return MAX_HEAD_DIM; }
int64_t paged_decode_max_group(void) { return MAX_GROUP; }

/* ---- greedy argmax -------------------------------------------------------------------------
 * out[row] = the index of the largest of the row's `vocab` logits, the first one on ties, or of
 * its first NaN if it has one (what torch's max(dim=-1) returns), for logits[row * row_stride + i].
 * With AVX-512 each lane keeps the first index of its own largest value, 16 values at a time; the
 * lanes' values then decide, and among equal ones the smallest index. */
#if HAVE_AVX512
#define WIDE_ARGMAX(LOAD16)                                                                           \
    if (vocab >= WIDE_LANES) {                                                                        \
        __m512 best = LOAD16(logits);                                                                 \
        __m512i best_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); \
        __m512i index = best_index;                                                                   \
        __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);                                 \
        for (i = WIDE_LANES; i + WIDE_LANES <= vocab; i += WIDE_LANES) {                              \
            index = _mm512_add_epi32(index, _mm512_set1_epi32(WIDE_LANES));                           \
            const __m512 value = LOAD16(logits + i);                                                  \
            const __mmask16 larger = _mm512_cmp_ps_mask(value, best, _CMP_GT_OQ);                     \
            nan |= _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);                                    \
            best = _mm512_mask_mov_ps(best, larger, value);                                           \
            best_index = _mm512_mask_mov_epi32(best_index, larger, index);                            \
        }                                                                                             \
        if (nan) {                                                                                    \
            i = 0; /* the scalar loop below finds the first NaN */                                    \
        } else {                                                                                      \
            top = _mm512_reduce_max_ps(best);                                                         \
            const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);         \
            top_index = _mm512_mask_reduce_min_epi32(tops, best_index);                               \
        }                                                                                             \
    }
#else
#define WIDE_ARGMAX(LOAD16)
#endif

#define DEFINE_ARGMAX(NAME, T, LOAD, LOAD16)                                                          \
    void NAME(const T *logits_rows, int64_t row_stride, int64_t rows, int64_t vocab, int64_t *out) {  \
        for (int64_t row = 0; row < rows; row++) {                                                    \
            const T *logits = logits_rows + row * row_stride;                                         \
            float top = -INFINITY;                                                                    \
            int64_t top_index = 0, i = 0;                                                             \
            WIDE_ARGMAX(LOAD16)                                                                       \
            for (; i < vocab; i++) {                                                                  \
                const float value = LOAD(logits + i);                                                 \
                if (isnan(value)) {                                                                   \
                    top_index = i;                                                                    \
                    break;                                                                            \
                }                                                                                     \
                if (value > top) {                                                                    \
                    top = value;                                                                      \
                    top_index = i;                                                                    \
                }                                                                                     \
            }                                                                                         \
            out[row] = top_index;                                                                     \
        }                                                                                             \
    }

DEFINE_ARGMAX(argmax_f32, float, f32_load, f32_load16)
DEFINE_ARGMAX(argmax_bf16, bf16_t, bf16_load, bf16_load16)
DEFINE_ARGMAX(argmax_f16, _Float16, f16_load, f16_load16)
