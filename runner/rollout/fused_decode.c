/* One decode step of a Llama-family model (Llama, Qwen2, SmolLM) on CPU, bf16 weights,
 * in a single call: runner/rollout/fused_decode.py explains why and builds this file.
 *
 * Layout: every linear's bf16 weight [N, K] is packed in blocks of 16 output rows, each
 * block stored k-pair-major: packed[((n / 16) * (K / 2) + k / 2) * 32 + (n % 16) * 2 + k % 2].
 * One AVX512-BF16 dot (vdpbf16ps) then multiplies a whole block row (16 outputs x 2 inputs)
 * by one input pair broadcast from a row of x, so a tile of 2 blocks x up to 12 rows keeps
 * 24 accumulators in registers and reads each weight byte once per 12 rows, with no
 * horizontal sums. Without AVX512-BF16 the same layout runs through plain C loops (the
 * tests' route on other CPUs; `auto` does not choose this path there).
 *
 * Numerics: the residual stream, norms, rotary embedding, attention and logits are float32;
 * only the inputs of the linears and the KV cache are rounded to bf16 (round to nearest even,
 * as torch's .to(torch.bfloat16)). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;

/* 2^f ~ 1 + sum_k C_k f^k on [0, 1): a least-squares fit of the relative error (2e-9 in float64) */
#define EXP_C1 6.931470423e-01f
#define EXP_C2 2.402293257e-01f
#define EXP_C3 5.548521721e-02f
#define EXP_C4 9.675539489e-03f
#define EXP_C5 1.246730511e-03f
#define EXP_C6 2.161407986e-04f

static inline float bf2f(bf16 x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

/* exp(x) to ~2 ulp for x in [-87, 88] (clamped outside), in plain arithmetic so that the
 * loops around it vectorise: 2^(x log2 e) = 2^i * 2^f, 2^f by a degree-6 polynomial. */
#pragma omp declare simd
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float t = x * 1.4426950408889634f, fi = floorf(t), f = t - fi;
    float p = EXP_C6;
    p = p * f + EXP_C5;
    p = p * f + EXP_C4;
    p = p * f + EXP_C3;
    p = p * f + EXP_C2;
    p = p * f + EXP_C1;
    p = p * f + 1.0f;
    uint32_t bits;
    memcpy(&bits, &p, 4);
    bits += (uint32_t)(int32_t)fi << 23;
    memcpy(&p, &bits, 4);
    return p;
}

#if defined(__AVX512BF16__)
/* exp_approx on 16 lanes (the same steps, so the same values) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, fi);
    __m512 p = _mm512_set1_ps(EXP_C6);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_C5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_cvttps_epi32(fi), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}
#endif

/* ---------------------------------------------------------------- packing */

/* Rows [0, N) of w (bf16 [N, K], row-major) into packed rows [n0, n0 + N) of out (rows past
 * the matrix in its last block are left unset: the products never store those lanes). A
 * thread takes whole rows, read in order; a block's lines stay in cache across its 16 rows. */
void fd_pack(const bf16 *w, int N, int K, bf16 *out, int n0) {
    const long half = K / 2;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int m = n0 + n;
        bf16 *blk = out + (long)(m / 16) * half * 32 + (m % 16) * 2;
        const bf16 *src = w + (long)n * K;
        for (long kk = 0; kk < half; kk++) memcpy(blk + kk * 32, src + 2 * kk, 4);
    }
}

/* -------------------------------------------------------------- products */

#define MAX_RB 12

#if defined(__AVX512BF16__)
/* weights stream from memory: ask for the block row PF k-pairs (2 KB) ahead of the one in use */
#ifndef PF
#define PF 32
#endif
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
/* y[r, n0 + j] (+)= sum_k x[r, k] W[n0 + j, k] for r < R, j < 16 * NB, blocks at wb. */
#define DEFINE_TILE(R, NB)                                                                   \
    static void tile_##R##_##NB(const bf16 *x, int K, const bf16 *wb, float *y, int ldy,    \
                                int nvalid, const float *bias) {                           \
        __m512 acc[R][NB];                                                                   \
        for (int r = 0; r < R; r++)                                                          \
            for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();                    \
        const long half = K / 2;                                                             \
        for (long kk = 0; kk < half; kk++) {                                                 \
            __m512bh w[NB];                                                                  \
            for (int b = 0; b < NB; b++)                                                     \
                { w[b] = (__m512bh)_mm512_loadu_si512((const void *)(wb + (b * half + kk) * 32)); PREFETCH(wb + (b * half + kk + PF) * 32); } \
            for (int r = 0; r < R; r++) {                                                    \
                int32_t pair;                                                                \
                memcpy(&pair, x + (long)r * K + 2 * kk, 4);                                  \
                __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);                             \
                for (int b = 0; b < NB; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], w[b], xb); \
            }                                                                                \
        }                                                                                    \
        for (int b = 0; b < NB; b++) {                                                       \
            int left = nvalid - 16 * b;                                                      \
            if (left <= 0) break;                                                            \
            __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);    \
            __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * b) : _mm512_setzero_ps(); \
            for (int r = 0; r < R; r++)                                                      \
                _mm512_mask_storeu_ps(y + (long)r * ldy + 16 * b, m, _mm512_add_ps(acc[r][b], bv)); \
        }                                                                                    \
    }
#define DEFINE_TILES(R) DEFINE_TILE(R, 1) DEFINE_TILE(R, 2)
DEFINE_TILES(1) DEFINE_TILES(2) DEFINE_TILES(3) DEFINE_TILES(4) DEFINE_TILES(5) DEFINE_TILES(6)
DEFINE_TILES(7) DEFINE_TILES(8) DEFINE_TILES(9) DEFINE_TILES(10) DEFINE_TILES(11) DEFINE_TILES(12)

typedef void (*tile_fn)(const bf16 *, int, const bf16 *, float *, int, int, const float *);
static const tile_fn TILES[MAX_RB + 1][3] = {
    {0, 0, 0},
    {0, tile_1_1, tile_1_2}, {0, tile_2_1, tile_2_2}, {0, tile_3_1, tile_3_2},
    {0, tile_4_1, tile_4_2}, {0, tile_5_1, tile_5_2}, {0, tile_6_1, tile_6_2},
    {0, tile_7_1, tile_7_2}, {0, tile_8_1, tile_8_2}, {0, tile_9_1, tile_9_2},
    {0, tile_10_1, tile_10_2}, {0, tile_11_1, tile_11_2}, {0, tile_12_1, tile_12_2},
};

static void tile(int R, int NB, const bf16 *x, int K, const bf16 *wb, float *y, int ldy, int nvalid,
                 const float *bias) {
    TILES[R][NB](x, K, wb, y, ldy, nvalid, bias);
}
#else
static void tile(int R, int NB, const bf16 *x, int K, const bf16 *wb, float *y, int ldy, int nvalid,
                 const float *bias) {
    const long half = K / 2;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 16 * NB && j < nvalid; j++) {
            const bf16 *blk = wb + (long)(j / 16) * half * 32 + (j % 16) * 2;
            float s = 0.0f;
            for (long kk = 0; kk < half; kk++)
                s += bf2f(x[(long)r * K + 2 * kk]) * bf2f(blk[kk * 32]) +
                     bf2f(x[(long)r * K + 2 * kk + 1]) * bf2f(blk[kk * 32 + 1]);
            y[(long)r * ldy + j] = s + (bias ? bias[j] : 0.0f);
        }
}
#endif

/* y [R, ldy] = x [R, K] (bf16) times packed W [N, K]^T (+ bias), inside a parallel region:
 * the 32-output tiles are shared among the threads, each tile runs over all rows. */
static void linear(const bf16 *x, int R, int K, const bf16 *w, int N, const float *bias, float *y, int ldy) {
    const int nblk = (N + 15) / 16, ntile = (nblk + 1) / 2;
    const long blk_elems = (long)(K / 2) * 32;
#pragma omp for schedule(static) nowait
    for (int t = 0; t < ntile; t++) {
        const int b0 = 2 * t, nb = (b0 + 2 <= nblk) ? 2 : 1;
        const int n0 = 16 * b0, nvalid = N - n0;
        for (int r0 = 0; r0 < R; r0 += MAX_RB) {
            const int rb = R - r0 < MAX_RB ? R - r0 : MAX_RB;
            tile(rb, nb, x + (long)r0 * K, K, w + b0 * blk_elems, y + (long)r0 * ldy + n0, ldy, nvalid,
                 bias ? bias + n0 : 0);
        }
    }
#pragma omp barrier
}

/* y [R, N] = x [R, K] times packed W^T on `threads` threads: the products alone (the bench's
 * compute ceiling for decoding) */
void fd_linear(const bf16 *x, int R, int K, const bf16 *w, int N, float *y, int threads) {
#pragma omp parallel num_threads(threads)
    linear(x, R, K, w, N, 0, y, N);
}

/* ------------------------------------------------------------------ model */

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, inter, vocab;
    int max_len;  /* KV cache positions per row */
    int max_rows; /* cache rows (slots) */
    int threads;
    float eps;
    const bf16 *embed;      /* [vocab, hidden] row-major */
    const float *norm;      /* [hidden] final norm */
    const bf16 *lm_head;    /* packed [vocab, hidden] */
    const float *const *ln1, *const *ln2;                   /* [layers] -> [hidden] */
    const bf16 *const *wqkv, *const *wo, *const *wgu, *const *wd; /* [layers] -> packed */
    const float *const *bqkv, *const *bo, *const *bgu, *const *bd; /* [layers] -> bias or NULL */
    bf16 *kc, *vc;          /* [layers, max_rows, kv_heads, max_len, head_dim] */
    const float *cos, *sin; /* [max_len, head_dim] by position */
    const int32_t *start;   /* [max_rows]: first cache position a slot attends to (left padding) */
    /* scratch, sized for the most rows one call takes (n) */
    float *h;               /* [n, hidden] residual stream */
    float *y;               /* [n, max(hidden + 2 * kv_heads * head_dim, 2 * inter)] */
    bf16 *x;                /* [n, max(hidden, inter)] inputs of the linears */
    float *scores;          /* [threads, heads / kv_heads, max_len] */
    float *buf;             /* [threads, buf_len]: a row's float32 values before their bf16 rounding */
    int buf_len;            /* >= max(hidden, inter) */
} Model;

/* dst[i] = bf16(src[i]): vcvtneps2bf16 (round to nearest even) where the CPU has it */
static void to_bf16(const float *src, bf16 *dst, int n) {
    int i = 0;
#if defined(__AVX512BF16__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
    for (; i < n; i++) dst[i] = f2bf(src[i]);
}

static void rmsnorm_to_bf16(const float *h, const float *w, int D, float eps, bf16 *out, float *buf) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < D; i++) ss += h[i] * h[i];
    const float inv = 1.0f / sqrtf(ss / D + eps);
#pragma omp simd
    for (int i = 0; i < D; i++) buf[i] = h[i] * inv * w[i];
    to_bf16(buf, out, D);
}

static void rope(float *v, const float *c, const float *s, int hd) {
    const int h2 = hd / 2;
#pragma omp simd
    for (int i = 0; i < h2; i++) {
        const float a = v[i], b = v[i + h2];
        v[i] = a * c[i] - b * s[i];
        v[i + h2] = b * c[i + h2] + a * s[i + h2];
    }
}

/* sum_i q[i] * bf16 k[i] */
static inline float dot_bf16(const float *q, const bf16 *k, int n) {
    int i = 0;
    float d = 0.0f;
#if defined(__AVX512BF16__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(k + i))), 16));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv, acc);
    }
    d = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) d += q[i] * bf2f(k[i]);
    return d;
}

/* o[i] += w * bf16 v[i] */
static inline void axpy_bf16(float *o, float w, const bf16 *v, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) o[i] += w * bf2f(v[i]);
}

/* Attention of the G query heads q [G, HD] sharing one kv head over T cached positions. */
static void attend(const float *q, const bf16 *K, const bf16 *V, int T, int G, int HD, float scale, float *p,
                   int ldp, float *o) {
    for (int g = 0; g < G; g++) {
        float *pg = p + (long)g * ldp, mx = -INFINITY;
        for (int j = 0; j < T; j++) {
            pg[j] = dot_bf16(q + g * HD, K + (long)j * HD, HD) * scale;
            mx = pg[j] > mx ? pg[j] : mx;
        }
        float z = 0.0f;
        int j = 0;
#if defined(__AVX512BF16__)
        __m512 zv = _mm512_setzero_ps();
        for (; j + 16 <= T; j += 16) {
            const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(pg + j), _mm512_set1_ps(mx)));
            _mm512_storeu_ps(pg + j, e);
            zv = _mm512_add_ps(zv, e);
        }
        z = _mm512_reduce_add_ps(zv);
#endif
        for (; j < T; j++) {
            pg[j] = exp_approx(pg[j] - mx);
            z += pg[j];
        }
        float *og = o + g * HD;
        for (int i = 0; i < HD; i++) og[i] = 0.0f;
        const float inv = 1.0f / z;
        for (j = 0; j < T; j++) axpy_bf16(og, pg[j] * inv, V + (long)j * HD, HD);
    }
}


/* the residual stream: h += y */
static void add_into(float *h, const float *y, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) h[i] += y[i];
}

/* a = bf16(silu(g) * u) */
static void swiglu(const float *g, const float *u, int n, bf16 *a, float *buf) {
    int i = 0;
#if defined(__AVX512BF16__)
    for (; i + 16 <= n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
        _mm512_storeu_ps(buf + i, _mm512_mul_ps(_mm512_div_ps(gv, den), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) buf[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
    to_bf16(buf, a, n);
}

/* One token for each of n rows: tokens [n], slots [n] (the cache row it belongs to), at [n]
 * (the cache position it is written to; it attends to its slot's positions start..at).
 * Rows of one slot at several positions are a prefill: all keys and values are written
 * before any row attends, so each sees exactly its earlier positions. logits [n_out, vocab]:
 * for rows out[0..n_out) only. */
void fd_step(const Model *m, int n, const int64_t *tokens, const int32_t *slots, const int32_t *at, int n_out,
             const int32_t *out, float *logits) {
    const int D = m->hidden, H = m->heads, KVH = m->kv_heads, HD = m->head_dim, I = m->inter;
    const int G = H / KVH, QKV = D + 2 * KVH * HD;
    const int ldy = QKV > 2 * I ? QKV : 2 * I; /* x rows are dense: stride = the next linear's K */
    const long row_stride = (long)KVH * m->max_len * HD, layer_stride = (long)m->max_rows * row_stride;
    const float scale = 1.0f / sqrtf((float)HD);
#pragma omp parallel num_threads(m->threads)
    {
        float *sc = m->scores + (long)omp_get_thread_num() * G * m->max_len;
        float *buf = m->buf + (long)omp_get_thread_num() * m->buf_len;
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) {
            const bf16 *e = m->embed + tokens[r] * (long)D;
            for (int i = 0; i < D; i++) m->h[(long)r * D + i] = bf2f(e[i]);
        }
        for (int l = 0; l < m->layers; l++) {
            bf16 *kc = m->kc + l * layer_stride, *vc = m->vc + l * layer_stride;
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) rmsnorm_to_bf16(m->h + (long)r * D, m->ln1[l], D, m->eps, m->x + (long)r * D, buf);
            linear(m->x, n, D, m->wqkv[l], QKV, m->bqkv[l], m->y, ldy);
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) { /* rotary on q and k; k and v into the cache */
                float *y = m->y + (long)r * ldy;
                const int t = at[r], pos = t - m->start[slots[r]];
                const float *c = m->cos + (long)pos * HD, *s = m->sin + (long)pos * HD;
                for (int hh = 0; hh < H; hh++) rope(y + hh * HD, c, s, HD);
                for (int kv = 0; kv < KVH; kv++) {
                    float *k = y + D + kv * HD, *v = y + D + KVH * HD + kv * HD;
                    rope(k, c, s, HD);
                    bf16 *kd = kc + slots[r] * row_stride + ((long)kv * m->max_len + t) * HD;
                    bf16 *vd = vc + slots[r] * row_stride + ((long)kv * m->max_len + t) * HD;
                    for (int i = 0; i < HD; i++) { kd[i] = f2bf(k[i]); vd[i] = f2bf(v[i]); }
                }
            }
#pragma omp for schedule(static)
            for (int job = 0; job < n * KVH; job++) { /* the G query heads of one kv head */
                const int r = job / KVH, kv = job % KVH, s0 = m->start[slots[r]], T = at[r] + 1 - s0;
                const long off = slots[r] * row_stride + ((long)kv * m->max_len + s0) * HD;
                attend(m->y + (long)r * ldy + kv * G * HD, kc + off, vc + off, T, G, HD, scale, sc, m->max_len, buf);
                to_bf16(buf, m->x + (long)r * D + kv * G * HD, G * HD);
            }
            /* attention output: x rows hold [heads * head_dim] = D values */
            linear(m->x, n, D, m->wo[l], D, m->bo[l], m->y, ldy);
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) {
                add_into(m->h + (long)r * D, m->y + (long)r * ldy, D);
                rmsnorm_to_bf16(m->h + (long)r * D, m->ln2[l], D, m->eps, m->x + (long)r * D, buf);
            }
            linear(m->x, n, D, m->wgu[l], 2 * I, m->bgu[l], m->y, ldy);
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) {
                const float *g = m->y + (long)r * ldy;
                swiglu(g, g + I, I, m->x + (long)r * I, buf);
            }
            linear(m->x, n, I, m->wd[l], D, m->bd[l], m->y, ldy);
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) add_into(m->h + (long)r * D, m->y + (long)r * ldy, D);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < n_out; i++) rmsnorm_to_bf16(m->h + (long)out[i] * D, m->norm, D, m->eps, m->x + (long)i * D, buf);
        linear(m->x, n_out, D, m->lm_head, m->vocab, 0, logits, m->vocab);
    }
}
