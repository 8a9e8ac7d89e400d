/* fermi's CPU matrix kernels for decode: x [m, k] float32 times a weight held in
 * blocks of 32 along k, with one float16 scale a block, the way llama.cpp's Q8_0
 * and Q4_0 hold them; the activations are quantized the same way (int8, one float32
 * scale per 32 values), so each block's product is an integer dot product.
 *
 *   q8: int8 [n, k] weights, scales [n, k/32]
 *   q4: [n, k/2] bytes, byte j of a block holds weights j (low nibble) and j+16
 *       (high nibble) of it, each stored as q+8 for q in [-8, 7]; scales [n, k/32]
 *   q4 with mins (a GGUF's Q4_1 and Q4_K blocks, kept as they are): the same nibbles
 *       q in [0, 15], weight = scale * q + min, mins [n, k/32] float16 too; the
 *       product is q4's (q - 8) plus, each block, (min + 8 scale) times the sum of x
 *
 * One path is chosen when the module loads: AVX-512 VNNI, AVX2, or plain C (which
 * the compiler vectorizes for the machine it builds on, NEON on ARM). Outputs are
 * split over OpenMP threads, which share torch's runtime (the same libgomp).
 * Called from backends/torch/storage.py with tensors' data pointers; the GIL is
 * released while it runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FERMI_X86 1
#endif

#define QK 32
#define TILE 4      /* rows of x multiplied together against each weight row (AVX2, C) */
#define TILE_VNNI 8 /* (AVX-512: more registers) */

/* x, quantized: q [m, k] int8 and s [m, k/32] its scales; for the AVX-512 path also
   sx [m, k/4] (each scale spread over 8 lanes) and c [m, k/4] (-8 times each 4 values' sum) */
typedef struct {
    const int8_t *q;
    const float *s, *sx;
    const int32_t *c;
    int k;
} X;

typedef void (*quantize_fn)(const float *x, int k, int8_t *q, float *s);
/* out[i * ldo] = one weight row . x row i, for i < m (m <= the path's tile) */
typedef void (*dot_fn)(int m, int nb, const uint8_t *w, const uint16_t *ws, const X *x, float *out, int ldo);

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ------------------------------------------------------------------ plain C */

static void quantize_c(const float *x, int k, int8_t *q, float *s) {
    for (int b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < QK; j++) q[b * QK + j] = (int8_t)lrintf(xb[j] * id);
        s[b] = d;
    }
}

static void dot_q8_c(int m, int nb, const uint8_t *w8, const uint16_t *ws, const X *x, float *out, int ldo) {
    const int8_t *w = (const int8_t *)w8;
    for (int i = 0; i < m; i++) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const int8_t *wb = w + b * QK, *xb = x->q + (size_t)i * x->k + b * QK;
            int32_t sum = 0;
            for (int j = 0; j < QK; j++) sum += wb[j] * xb[j];
            acc += (float)sum * half_to_float(ws[b]) * x->s[(size_t)i * nb + b];
        }
        out[(size_t)i * ldo] = acc;
    }
}

static void dot_q4_c(int m, int nb, const uint8_t *w, const uint16_t *ws, const X *x, float *out, int ldo) {
    for (int i = 0; i < m; i++) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *wb = w + b * (QK / 2);
            const int8_t *xb = x->q + (size_t)i * x->k + b * QK;
            int32_t sum = 0;
            for (int j = 0; j < QK / 2; j++)
                sum += ((wb[j] & 15) - 8) * xb[j] + ((wb[j] >> 4) - 8) * xb[j + QK / 2];
            acc += (float)sum * half_to_float(ws[b]) * x->s[(size_t)i * nb + b];
        }
        out[(size_t)i * ldo] = acc;
    }
}

/* ------------------------------------------------------------------ x86 */

#ifdef FERMI_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static void quantize_avx2(const float *x, int k, int8_t *q, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < k / QK; b++) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + b * QK + 8 * j);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256 mul = _mm256_set1_ps(id);
        __m256i i[4];
        for (int j = 0; j < 4; j++)
            i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* undo the lanes' order */
        _mm256_storeu_si256((__m256i *)(q + b * QK), p);
        s[b] = d;
    }
}

/* 32 int8 weights (wv, as |w| and its signs) times 32 int8 x -> 8 int32 partial sums */
AVX2 static inline __m256i dot32_avx2(__m256i aw, __m256i wv, __m256i xv) {
    __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

AVX2 static inline __m256i q4_unpack(const uint8_t *wb) {
    __m128i raw = _mm_loadu_si128((const __m128i *)wb);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw); /* low nibbles: weights 0-15, high: 16-31 */
    return _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(15)), _mm256_set1_epi8(8));
}

/* AVX2: a block (32 weights, as int8 from LOAD) at a time, against up to TILE rows of x. */
#define DOT_AVX2(NAME, LOAD)                                                                                     \
    AVX2 static inline __attribute__((always_inline)) void NAME##_m(const int m, int nb, const uint8_t *w,      \
                                                                   const uint16_t *ws, const X *x, float *out, \
                                                                   int ldo) {                                  \
        __m256 acc[TILE];                                                                                        \
        for (int i = 0; i < m; i++) acc[i] = _mm256_setzero_ps();                                                \
        for (int b = 0; b < nb; b++) {                                                                           \
            __m256i wv = LOAD;                                                                                   \
            __m256i aw = _mm256_abs_epi8(wv);                                                                    \
            float d = _cvtsh_ss(ws[b]);                                                                          \
            for (int i = 0; i < m; i++) {                                                                        \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x->q + (size_t)i * x->k + b * QK));            \
                __m256 p = _mm256_cvtepi32_ps(dot32_avx2(aw, wv, xv));                                           \
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * x->s[(size_t)i * nb + b]), p, acc[i]);               \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < m; i++) out[(size_t)i * ldo] = hsum256(acc[i]);                                      \
    }                                                                                                            \
    AVX2 static void NAME(int m, int nb, const uint8_t *w, const uint16_t *ws, const X *x, float *out, int ldo) { \
        switch (m) { /* a constant m: the accumulators stay in registers */                                     \
        case 1: NAME##_m(1, nb, w, ws, x, out, ldo); break;                                                      \
        case 2: NAME##_m(2, nb, w, ws, x, out, ldo); break;                                                      \
        case 3: NAME##_m(3, nb, w, ws, x, out, ldo); break;                                                      \
        default: NAME##_m(4, nb, w, ws, x, out, ldo); break;                                                     \
        }                                                                                                        \
    }

DOT_AVX2(dot_q8_avx2, _mm256_loadu_si256((const __m256i *)(w + b * QK)))
DOT_AVX2(dot_q4_avx2, q4_unpack(w + b * (QK / 2)))

/* AVX-512 VNNI: two blocks (64 weights) a step, their scales spread over the 16 lanes
   (8 each, as x->sx holds x's). q8: |w| times x with w's signs, as u8 x s8. q4: the
   nibbles (0..15) as they are times x, less 8 sum(x) (x->c, the accumulator's start). */
VNNI static inline __m512 scales2(const uint16_t *ws) {
    int32_t two;
    memcpy(&two, ws, 4);
    __m512 both = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), both);
}

static float tail_block(int bits, const uint8_t *w, const uint16_t *ws, const X *x, int i, int b) {
    float r;
    (bits == 8 ? dot_q8_c : dot_q4_c)(1, 1, w + (size_t)b * (bits == 8 ? QK : QK / 2), ws + b,
                                      &(X){x->q + (size_t)i * x->k + b * QK, x->s + (size_t)i * (x->k / QK) + b,
                                           NULL, NULL, QK},
                                      &r, 1);
    return r;
}

#define DOT_VNNI(NAME, BITS, WEIGHTS, PRODUCT)                                                                    \
    VNNI static inline __attribute__((always_inline)) void NAME##_m(const int m, int nb, const uint8_t *w,       \
                                                                   const uint16_t *ws, const X *x, float *out,  \
                                                                   int ldo) {                                   \
        __m512 acc[TILE_VNNI];                                                                                    \
        float tail[TILE_VNNI] = {0};                                                                              \
        for (int i = 0; i < m; i++) acc[i] = _mm512_setzero_ps();                                                 \
        int b = 0;                                                                                                \
        for (; b + 2 <= nb; b += 2) {                                                                             \
            WEIGHTS;                                                                                              \
            __m512 wsv = scales2(ws + b);                                                                         \
            for (int i = 0; i < m; i++) {                                                                         \
                __m512i xv = _mm512_loadu_si512(x->q + (size_t)i * x->k + b * QK);                                \
                __m512i p = PRODUCT;                                                                              \
                __m512 sc = _mm512_mul_ps(wsv, _mm512_loadu_ps(x->sx + (size_t)i * (x->k / 4) + b * 8));          \
                acc[i] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc[i]);                                      \
            }                                                                                                     \
        }                                                                                                         \
        if (b < nb)                                                                                               \
            for (int i = 0; i < m; i++) tail[i] = tail_block(BITS, w, ws, x, i, b);                               \
        for (int i = 0; i < m; i++) out[(size_t)i * ldo] = _mm512_reduce_add_ps(acc[i]) + tail[i];                \
    }                                                                                                             \
    VNNI static void NAME(int m, int nb, const uint8_t *w, const uint16_t *ws, const X *x, float *out, int ldo) { \
        switch (m) {                                                                                              \
        case 1: NAME##_m(1, nb, w, ws, x, out, ldo); break;                                                       \
        case 2: NAME##_m(2, nb, w, ws, x, out, ldo); break;                                                       \
        case 3: NAME##_m(3, nb, w, ws, x, out, ldo); break;                                                       \
        case 4: NAME##_m(4, nb, w, ws, x, out, ldo); break;                                                       \
        case 5: NAME##_m(5, nb, w, ws, x, out, ldo); break;                                                       \
        case 6: NAME##_m(6, nb, w, ws, x, out, ldo); break;                                                       \
        case 7: NAME##_m(7, nb, w, ws, x, out, ldo); break;                                                       \
        default: NAME##_m(8, nb, w, ws, x, out, ldo); break;                                                      \
        }                                                                                                         \
    }

DOT_VNNI(dot_q8_vnni, 8,
         __m512i wv = _mm512_loadu_si512(w + b * QK);
         __mmask64 neg = _mm512_movepi8_mask(wv); __m512i aw = _mm512_abs_epi8(wv),
         _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv)))

DOT_VNNI(dot_q4_vnni, 4,
         __m256i raw = _mm256_loadu_si256((const __m256i *)(w + b * (QK / 2)));
         __m256i lo = _mm256_and_si256(raw, _mm256_set1_epi8(15));
         __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(15));
         __m512i lohi = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
         __m512i nib = _mm512_shuffle_i64x2(lohi, lohi, _MM_SHUFFLE(3, 1, 2, 0)), /* block b, then b+1 */
         _mm512_dpbusd_epi32(_mm512_loadu_si512(x->c + (size_t)i * (x->k / 4) + b * 8), nib, xv))
#endif

/* ------------------------------------------------------------------ mins (q4 with mins) */

/* t[i] += sum over blocks b of (mins[b] + 8 ws[b]) * sums[i, b], for i < m: a block's
   min times the sum of its x (sums: each block's quantized x summed, times its scale) */
typedef void (*mins_fn)(int m, int nb, const uint16_t *mins, const uint16_t *ws, const float *sums, float *t);

static void mins_c(int m, int nb, const uint16_t *mins, const uint16_t *ws, const float *sums, float *t) {
    for (int i = 0; i < m; i++) {
        float r = 0.0f;
        for (int b = 0; b < nb; b++) r += (half_to_float(mins[b]) + 8.0f * half_to_float(ws[b])) * sums[(size_t)i * nb + b];
        t[i] += r;
    }
}

#ifdef FERMI_X86
AVX2 static void mins_avx2(int m, int nb, const uint16_t *mins, const uint16_t *ws, const float *sums, float *t) {
    for (int i = 0; i < m; i++) {
        const float *si = sums + (size_t)i * nb;
        __m256 acc = _mm256_setzero_ps();
        int b = 0;
        for (; b + 8 <= nb; b += 8) {
            __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + b)));
            __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ws + b)));
            acc = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.0f), sc, mn), _mm256_loadu_ps(si + b), acc);
        }
        float r = hsum256(acc);
        for (; b < nb; b++) r += (_cvtsh_ss(mins[b]) + 8.0f * _cvtsh_ss(ws[b])) * si[b];
        t[i] += r;
    }
}
#endif

/* ------------------------------------------------------------------ dispatch */

static quantize_fn quantize = quantize_c;
static dot_fn dot_q8 = dot_q8_c, dot_q4 = dot_q4_c;
static mins_fn min_terms = mins_c;
static int tile = TILE, spread = 0; /* spread: x->sx and x->c are made (the AVX-512 path) */
static const char *path = "c";

/* The best path this CPU runs, or the one named (a lower one, for tests): 0 if it cannot. */
static int choose_path(const char *want) {
    quantize = quantize_c, dot_q8 = dot_q8_c, dot_q4 = dot_q4_c, min_terms = mins_c, tile = TILE, spread = 0, path = "c";
    if (want && !strcmp(want, "c")) return 1;
#ifdef FERMI_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return !want;
    quantize = quantize_avx2, dot_q8 = dot_q8_avx2, dot_q4 = dot_q4_avx2, min_terms = mins_avx2, path = "avx2";
    if (want && !strcmp(want, "avx2")) return 1;
    if (!(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bw")))
        return !want;
    dot_q8 = dot_q8_vnni, dot_q4 = dot_q4_vnni, tile = TILE_VNNI, spread = 1, path = "avx512-vnni";
    return !want || !strcmp(want, "avx512-vnni");
#else
    return !want;
#endif
}

/* What a call does around the product (all optional): the row it quantizes is
   silu(gate) * up of x's two halves (glu: x is [m, 2k]), then RMS-normalized and times
   norm's weight (norm: an RMSNorm's weight, eps its epsilon); bias is added to each
   output, and acc adds the result to what y holds (a residual) instead of writing it. */
typedef struct {
    const float *norm, *bias;
    float eps;
    int glu, acc;
    const uint16_t *mins; /* q4 with mins: float16 [n, k/32] */
} Fuse;

#define MAX_ROWS 64 /* rows of x a product takes (a call with more makes several) */

static void prepared(const float *x, int k, const Fuse *f, float *a) {
    if (f->glu)
        for (int j = 0; j < k; j++) a[j] = x[j] / (1.0f + expf(-x[j])) * x[k + j];
    else
        memcpy(a, x, (size_t)k * sizeof(float));
    if (f->norm) {
        float ss = 0.0f;
        for (int j = 0; j < k; j++) ss += a[j] * a[j];
        const float r = 1.0f / sqrtf(ss / (float)k + f->eps);
        for (int j = 0; j < k; j++) a[j] = a[j] * r * f->norm[j];
    }
}

static int matmul(int bits, float *y, const float *x, const uint8_t *w, const uint16_t *ws, int m, int n, int k,
                  const Fuse *f) {
    const int nb = k / QK, row_bytes = bits == 8 ? k : k / 2;
    const dot_fn dot = bits == 8 ? dot_q8 : dot_q4;
    const int prep = f->glu || f->norm;
    int8_t *q = malloc((size_t)m * k);
    float *s = malloc((size_t)m * nb * sizeof(float));
    float *a = prep ? malloc((size_t)k * sizeof(float)) : NULL;
    float *sums = f->mins ? malloc((size_t)m * nb * sizeof(float)) : NULL;
    float *sx = spread ? malloc((size_t)m * k / 4 * sizeof(float)) : NULL;
    int32_t *c = spread && bits == 4 ? malloc((size_t)m * k / 4 * sizeof(int32_t)) : NULL; /* (q4's only) */
    if (!q || !s || (prep && !a) || (f->mins && !sums) || (spread && !sx) || (spread && bits == 4 && !c)) {
        free(q), free(s), free(a), free(sums), free(sx), free(c);
        return -1;
    }
    for (int i = 0; i < m; i++) {
        const float *row = x + (size_t)i * (f->glu ? 2 * k : k);
        if (prep) prepared(row, k, f, a);
        quantize(prep ? a : row, k, q + (size_t)i * k, s + (size_t)i * nb);
    }
    if (sums)
        for (size_t b = 0; b < (size_t)m * nb; b++) {
            int32_t total = 0;
            for (int j = 0; j < QK; j++) total += q[b * QK + j];
            sums[b] = (float)total * s[b];
        }
    if (spread)
        for (size_t j = 0; j < (size_t)m * k / 4; j++) {
            const int8_t *four = q + 4 * j;
            sx[j] = s[j / 8];
            if (c) c[j] = -8 * (four[0] + four[1] + four[2] + four[3]);
        }
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n; r++) {
        float t[MAX_ROWS];
        for (int i = 0; i < m; i += tile) {
            X part = {q + (size_t)i * k, s + (size_t)i * nb, sx ? sx + (size_t)i * k / 4 : NULL,
                      c ? c + (size_t)i * k / 4 : NULL, k};
            dot(m - i < tile ? m - i : tile, nb, w + (size_t)r * row_bytes, ws + (size_t)r * nb, &part, t + i, 1);
        }
        if (sums) min_terms(m, nb, f->mins + (size_t)r * nb, ws + (size_t)r * nb, sums, t);
        const float b = f->bias ? f->bias[r] : 0.0f;
        for (int i = 0; i < m; i++) {
            float *o = y + (size_t)i * n + r;
            *o = f->acc ? *o + (t[i] + b) : t[i] + b;
        }
    }
    free(q), free(s), free(a), free(sums), free(sx), free(c);
    return 0;
}

/* Arguments: data pointers and sizes as ints, epsilons and scales as floats. */
static int parsed(PyObject *const *args, Py_ssize_t nargs, const char *kinds, void **p, long long *d, double *e) {
    if (nargs != (Py_ssize_t)strlen(kinds)) {
        PyErr_Format(PyExc_TypeError, "expected %d arguments, got %d", (int)strlen(kinds), (int)nargs);
        return 0;
    }
    for (int i = 0, np = 0, nd = 0, ne = 0; kinds[i]; i++) {
        if (kinds[i] == 'p') p[np++] = PyLong_AsVoidPtr(args[i]);
        else if (kinds[i] == 'd') d[nd++] = PyLong_AsLongLong(args[i]);
        else e[ne++] = PyFloat_AsDouble(args[i]);
        if (PyErr_Occurred()) return 0;
    }
    return 1;
}

/* q8_linear(y, x, w, scales, m, n, k, [bias, norm, eps, glu, acc]) / q4_linear(..., [mins]) */
static PyObject *linear(PyObject *const *args, Py_ssize_t nargs, int bits) {
    void *p[7] = {0};
    long long d[5] = {0};
    double e[1] = {0};
    const char *kinds = nargs == 7 ? "ppppddd" : nargs == 12 || bits == 8 ? "ppppdddppedd" : "ppppdddppeddp";
    if (!parsed(args, nargs, kinds, p, d, e)) return NULL;
    if (d[2] % QK || d[0] < 1 || d[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "k must be a multiple of 32, m and n positive");
        return NULL;
    }
    Fuse f = {p[5], p[4], (float)e[0], (int)d[3], (int)d[4], p[6]};
    const int m = (int)d[0], n = (int)d[1], k = (int)d[2], width = f.glu ? 2 * k : k;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS for (int i = 0; i < m && !failed; i += MAX_ROWS) failed =
        matmul(bits, (float *)p[0] + (size_t)i * n, (const float *)p[1] + (size_t)i * width, p[2], p[3],
               m - i < MAX_ROWS ? m - i : MAX_ROWS, n, k, &f);
    Py_END_ALLOW_THREADS if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ attention (decode) */

/* One decode step's attention for m rows, each one new token of its own sequence:
   qkv [m, (heads + 2 kv_heads) * hd] (q, k, v heads; changed in place), the layer's
   cache k, v [batch, kv_heads, cap, hd], cos/sin [positions, hd] (sin carrying
   rotate_half's sign), rows[i] / pos[i] (int64) the cache row and position of row i.
   Each row's q and k heads get their RMSNorm (qn, kn: weights, or NULL) and RoPE, its
   k and v go to the cache at pos, then each head attends over positions [lo, pos] of
   its row (lo: pos - window + 1 with a sliding window) -> out [m, heads * hd]. */
typedef struct {
    float *out, *qkv, *kc, *vc;
    const float *cos, *sin, *qn, *kn;
    const int64_t *rows, *pos;
    int m, heads, kvh, hd, cap, window;
    float eps, scale;
} Attend;

#define INLINE static inline __attribute__((always_inline))

INLINE void head_prep(float *v, int hd, const float *norm, float eps, const float *cs, const float *sn, float *t) {
    if (norm) {
        float ss = 0.0f;
        for (int j = 0; j < hd; j++) ss += v[j] * v[j];
        const float r = 1.0f / sqrtf(ss / (float)hd + eps);
        for (int j = 0; j < hd; j++) v[j] = v[j] * r * norm[j];
    }
    const int half = hd / 2;
    memcpy(t, v, (size_t)hd * sizeof(float));
    for (int j = 0; j < hd; j++) v[j] = t[j] * cs[j] + t[j < half ? j + half : j - half] * sn[j];
}

INLINE void attend_head(const Attend *a, int i, int h, float *sc) {
    const int hd = a->hd, p = (int)a->pos[i], g = h / (a->heads / a->kvh), width = (a->heads + 2 * a->kvh) * hd;
    const int lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
    const float *q = a->qkv + (size_t)i * width + (size_t)h * hd;
    const size_t base = ((size_t)a->rows[i] * a->kvh + g) * a->cap * hd;
    const float *K = a->kc + base, *V = a->vc + base;
    float mx = -INFINITY;
    for (int t = lo; t <= p; t++) {
        const float *kt = K + (size_t)t * hd;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < hd; j++) s += q[j] * kt[j];
        s *= a->scale;
        sc[t - lo] = s;
        mx = s > mx ? s : mx;
    }
    const int n = p - lo + 1;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; t++) {
        sc[t] = expf(sc[t] - mx);
        sum += sc[t];
    }
    float *o = a->out + ((size_t)i * a->heads + h) * hd;
    for (int j = 0; j < hd; j++) o[j] = 0.0f;
    for (int t = 0; t < n; t++) {
        const float *vt = V + (size_t)(lo + t) * hd, w = sc[t];
#pragma omp simd
        for (int j = 0; j < hd; j++) o[j] += w * vt[j];
    }
    const float inv = 1.0f / sum;
    for (int j = 0; j < hd; j++) o[j] *= inv;
}

typedef void (*head_fn)(const Attend *a, int i, int h, float *sc);
static void attend_head_c(const Attend *a, int i, int h, float *sc) { attend_head(a, i, h, sc); }
#ifdef FERMI_X86
AVX2 static void attend_head_avx2(const Attend *a, int i, int h, float *sc) { attend_head(a, i, h, sc); }
VNNI static void attend_head_avx512(const Attend *a, int i, int h, float *sc) { attend_head(a, i, h, sc); }
#endif

static int attend_rows(const Attend *a) {
    const int hd = a->hd, width = (a->heads + 2 * a->kvh) * hd;
    float t[1024];
    if (hd > 1024 || hd % 2 || a->heads % a->kvh) return -2;
    for (int i = 0; i < a->m; i++) {
        float *row = a->qkv + (size_t)i * width;
        const int p = (int)a->pos[i];
        const float *cs = a->cos + (size_t)p * hd, *sn = a->sin + (size_t)p * hd;
        for (int h = 0; h < a->heads + a->kvh; h++)
            head_prep(row + (size_t)h * hd, hd, h < a->heads ? a->qn : a->kn, a->eps, cs, sn, t);
        for (int g = 0; g < a->kvh; g++) {
            const size_t at = (((size_t)a->rows[i] * a->kvh + g) * a->cap + p) * hd;
            memcpy(a->kc + at, row + (size_t)(a->heads + g) * hd, (size_t)hd * sizeof(float));
            memcpy(a->vc + at, row + (size_t)(a->heads + a->kvh + g) * hd, (size_t)hd * sizeof(float));
        }
    }
    /* (the parallel region's body is a function of its own, compiled for no target: the
       heads go through a pointer to the path's copy) */
    head_fn head = attend_head_c;
#ifdef FERMI_X86
    head = !strcmp(path, "avx512-vnni") ? attend_head_avx512 : !strcmp(path, "avx2") ? attend_head_avx2 : head;
#endif
    int failed = 0;
#pragma omp parallel
    {
        float *sc = malloc((size_t)a->cap * sizeof(float));
        if (!sc) failed = -1;
#pragma omp for schedule(static)
        for (int task = 0; task < a->m * a->heads; task++)
            if (sc) head(a, task / a->heads, task % a->heads, sc);
        free(sc);
    }
    return failed;
}

/* attend(out, qkv, kc, vc, cos, sin, qn, kn, rows, pos, m, heads, kv_heads, hd, cap, window, eps, scale) */
static PyObject *attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *p[10];
    long long d[6];
    double e[2];
    if (!parsed(args, nargs, "ppppppppppddddddee", p, d, e)) return NULL;
    Attend a = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9],
                (int)d[0], (int)d[1], (int)d[2], (int)d[3], (int)d[4], (int)d[5], (float)e[0], (float)e[1]};
    if (a.m < 1 || a.kvh < 1 || a.heads < 1) {
        PyErr_SetString(PyExc_ValueError, "m, heads and kv_heads must be positive");
        return NULL;
    }
    for (int i = 0; i < a.m; i++)
        if (a.pos[i] < 0 || a.pos[i] >= a.cap) {
            PyErr_SetString(PyExc_ValueError, "a position is outside the cache");
            return NULL;
        }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = attend_rows(&a);
    Py_END_ALLOW_THREADS if (failed == -1) return PyErr_NoMemory();
    if (failed) {
        PyErr_SetString(PyExc_ValueError, "head_dim must be even and at most 1024, heads a multiple of kv_heads");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *q8_linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs) { return linear(args, nargs, 8); }
static PyObject *q4_linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs) { return linear(args, nargs, 4); }

static PyObject *q8_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    /* (x, q, s, m, k): the activations' quantization, for tests */
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "expected (x, q, s, m, k)");
        return NULL;
    }
    const float *x = PyLong_AsVoidPtr(args[0]);
    int8_t *q = PyLong_AsVoidPtr(args[1]);
    float *s = PyLong_AsVoidPtr(args[2]);
    long long m = PyLong_AsLongLong(args[3]), k = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    for (long long i = 0; i < m; i++) quantize(x + i * k, (int)k, q + i * k, s + i * (k / QK));
    Py_RETURN_NONE;
}

static PyObject *use(PyObject *self, PyObject *arg) {
    const char *want = PyUnicode_AsUTF8(arg);
    if (!want) return NULL;
    int ok = choose_path(want);
    if (!ok) choose_path(NULL);
    return PyBool_FromLong(ok);
}

static PyObject *info(PyObject *self, PyObject *unused) {
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    return Py_BuildValue("{s:s,s:i}", "path", path, "threads", threads);
}

static PyMethodDef methods[] = {
    {"q8_linear", (PyCFunction)(void (*)(void))q8_linear, METH_FASTCALL, "y = x . dequantized(q8 weight)^T"},
    {"q4_linear", (PyCFunction)(void (*)(void))q4_linear, METH_FASTCALL, "y = x . dequantized(q4 weight)^T"},
    {"q8_quantize", (PyCFunction)(void (*)(void))q8_quantize, METH_FASTCALL, "x -> int8 blocks and their scales"},
    {"attend", (PyCFunction)(void (*)(void))attend, METH_FASTCALL, "one decode step's attention (RoPE, cache write)"},
    {"info", info, METH_NOARGS, "the path chosen and the threads"},
    {"use", use, METH_O, "use(path) -> whether this CPU runs it (else the best path stays): for tests"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    choose_path(NULL);
    return PyModule_Create(&module);
}
