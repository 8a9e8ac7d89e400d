/* fermi's CPU matrix kernels for decode: x [m, k] float32 times a weight held in
 * blocks of 32 along k, with one float16 scale a block, the way llama.cpp's Q8_0
 * and Q4_0 hold them; the activations are quantized the same way (int8, one float32
 * scale per 32 values), so each block's product is an integer dot product.
 *
 *   q8: int8 [n, k] weights, scales [n, k/32]
 *   q4: [n, k/2] bytes, byte j of a block holds weights j (low nibble) and j+16
 *       (high nibble) of it, each stored as q+8 for q in [-8, 7]; scales [n, k/32]
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

/* ------------------------------------------------------------------ dispatch */

static quantize_fn quantize = quantize_c;
static dot_fn dot_q8 = dot_q8_c, dot_q4 = dot_q4_c;
static int tile = TILE, spread = 0; /* spread: x->sx and x->c are made (the AVX-512 path) */
static const char *path = "c";

/* The best path this CPU runs, or the one named (a lower one, for tests): 0 if it cannot. */
static int choose_path(const char *want) {
    quantize = quantize_c, dot_q8 = dot_q8_c, dot_q4 = dot_q4_c, tile = TILE, spread = 0, path = "c";
    if (want && !strcmp(want, "c")) return 1;
#ifdef FERMI_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return !want;
    quantize = quantize_avx2, dot_q8 = dot_q8_avx2, dot_q4 = dot_q4_avx2, path = "avx2";
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

static int matmul(int bits, float *y, const float *x, const uint8_t *w, const uint16_t *ws, int m, int n, int k) {
    const int nb = k / QK, row_bytes = bits == 8 ? k : k / 2;
    const dot_fn dot = bits == 8 ? dot_q8 : dot_q4;
    int8_t *q = malloc((size_t)m * k);
    float *s = malloc((size_t)m * nb * sizeof(float));
    float *sx = spread ? malloc((size_t)m * k / 4 * sizeof(float)) : NULL;
    int32_t *c = spread && bits == 4 ? malloc((size_t)m * k / 4 * sizeof(int32_t)) : NULL; /* (q4's only) */
    if (!q || !s || (spread && !sx) || (spread && bits == 4 && !c)) {
        free(q), free(s), free(sx), free(c);
        return -1;
    }
    for (int i = 0; i < m; i++) quantize(x + (size_t)i * k, k, q + (size_t)i * k, s + (size_t)i * nb);
    if (spread)
        for (size_t j = 0; j < (size_t)m * k / 4; j++) {
            const int8_t *four = q + 4 * j;
            sx[j] = s[j / 8];
            if (c) c[j] = -8 * (four[0] + four[1] + four[2] + four[3]);
        }
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n; r++) {
        for (int i = 0; i < m; i += tile) {
            X part = {q + (size_t)i * k, s + (size_t)i * nb, sx ? sx + (size_t)i * k / 4 : NULL,
                      c ? c + (size_t)i * k / 4 : NULL, k};
            dot(m - i < tile ? m - i : tile, nb, w + (size_t)r * row_bytes, ws + (size_t)r * nb, &part,
                y + (size_t)i * n + r, n);
        }
    }
    free(q), free(s), free(sx), free(c);
    return 0;
}

/* q8_linear(y, x, w, scales, m, n, k) / q4_linear(...): data pointers as ints */
static PyObject *linear(PyObject *const *args, Py_ssize_t nargs, int bits) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "expected (y, x, w, scales, m, n, k)");
        return NULL;
    }
    void *p[4];
    long long d[3];
    for (int i = 0; i < 4; i++) {
        p[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred()) return NULL;
    }
    for (int i = 0; i < 3; i++) {
        d[i] = PyLong_AsLongLong(args[4 + i]);
        if (PyErr_Occurred()) return NULL;
    }
    if (d[2] % QK || d[0] < 1 || d[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "k must be a multiple of 32, m and n positive");
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS failed = matmul(bits, p[0], p[1], p[2], p[3], (int)d[0], (int)d[1], (int)d[2]);
    Py_END_ALLOW_THREADS if (failed) return PyErr_NoMemory();
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
    {"info", info, METH_NOARGS, "the path chosen and the threads"},
    {"use", use, METH_O, "use(path) -> whether this CPU runs it (else the best path stays): for tests"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    choose_path(NULL);
    return PyModule_Create(&module);
}
