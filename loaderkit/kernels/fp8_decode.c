/* fp8 -> float32 / bfloat16 / float16 decode with a scale, bit-exact with the reference
 * definition ``(q.float() * scale).to(dtype)`` of loaderkit.kernels.quant.
 *
 * Compiled at run time by loaderkit.kernels.compiled (the system C compiler, -march=native) and
 * called through ctypes; every entry point returns 0, or -1 when it cannot do the request (the
 * caller then takes the torch route).
 *
 * Formats in:  0 = float8_e4m3fn, 1 = float8_e5m2 (other bytes use the generic table path).
 * Formats out: 0 = float32, 1 = bfloat16, 2 = float16.
 *
 * ``lk_decode_flat(..., direct=1)`` is the unscaled decode ``q.to(dtype)``: no product is formed
 * (a product quiets a signalling NaN) and bfloat16 NaN is 0x7FC0, as torch's scalar conversion
 * writes it (its vectorized float32 -> bfloat16 conversion writes 0xFFFF).
 *
 * The product is formed in float32 exactly as the reference forms it: ``v * s`` with v the
 * float32 value of the code (torch's own NaN bits included, passed in as ``table``) and s the
 * float32 scale; the conversion to 16 bits rounds to nearest even as torch's vectorized CPU
 * conversions do (bfloat16: NaN -> 0xFFFF; float16: the hardware conversion, NaN keeps its sign
 * and the top payload bits).
 *
 * With AVX2 and F16C the codes are widened without a table: an e4m3fn byte shifted into a
 * float16 is its value times 2^-8 (the hardware float16 -> float32 conversion handles the
 * subnormals), so ``v * s == (v * 2^-8) * (s * 2^8)`` exactly, with no rounding in either factor,
 * as long as ``s * 2^8`` is finite: segments whose |s| is 2^100 or more, zero or NaN take the
 * table loop (which also covers inf * 0). An e5m2 byte shifted left by 8 *is* a float16.
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define LK_SIMD 1
#else
#define LK_SIMD 0
#endif

int lk_simd(void) { return LK_SIMD; }

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f, uint16_t nan) {
    uint32_t x = f32_bits(f);
    if (f != f) return nan;
    return (uint16_t)((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

/* round to nearest even; NaN as the x86 hardware conversion gives it */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) return sign | 0x7E00 | (uint16_t)((ax >> 13) & 0x1FF);
    if (ax >= 0x477FF000) return sign | 0x7C00; /* rounds to infinity */
    if (ax < 0x38800000) {                      /* a float16 subnormal or zero */
        float magic = bits_f32((127 - 15 + 23 - 10 + 1) << 23);
        float a = bits_f32(ax) + magic;
        return sign | (uint16_t)(f32_bits(a) - f32_bits(magic));
    }
    uint32_t odd = (ax >> 13) & 1;
    ax += ((uint32_t)(15 - 127) << 23) + 0xFFF + odd;
    return sign | (uint16_t)(ax >> 13);
}

/* internal: the unscaled decode of each format out (bfloat16 NaN as 0x7FC0, no product) */
#define F32_DIRECT 3
#define BF16_DIRECT 4
#define F16_DIRECT 5

/* n codes with one scale, through the 256-entry table of their float32 values */
static void seg_table(const uint8_t *q, void *out, int64_t n, float s, const float *table, int fout) {
    if (fout == F32_DIRECT) {
        float *o = (float *)out;
        for (int64_t i = 0; i < n; i++) o[i] = table[q[i]];
    } else if (fout == BF16_DIRECT) {
        uint16_t *o = (uint16_t *)out;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_bf16(table[q[i]], 0x7FC0);
    } else if (fout == F16_DIRECT) {
        uint16_t *o = (uint16_t *)out;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_f16(table[q[i]]);
    } else if (fout == 0) {
        float *o = (float *)out;
        for (int64_t i = 0; i < n; i++) o[i] = table[q[i]] * s;
    } else if (fout == 1) {
        uint16_t *o = (uint16_t *)out;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_bf16(table[q[i]] * s, 0xFFFF);
    } else {
        uint16_t *o = (uint16_t *)out;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_f16(table[q[i]] * s);
    }
}

#if LK_SIMD
/* 16 codes -> 16 products v * s (as two vectors of 8); *nan: the 16-bit lanes whose code is
 * NaN (the only lanes whose product is NaN, s being finite and non-zero) */
static inline void widen16(__m128i b, int fin, __m256 vs, __m256 *lo, __m256 *hi, __m256i *nan) {
    __m256i x = _mm256_cvtepu8_epi16(b);
    __m256i h;
    if (fin == 0) {
        const __m256i c7f = _mm256_set1_epi16(0x7F);
        __m256i sign = _mm256_slli_epi16(_mm256_andnot_si256(c7f, x), 8);
        __m256i em = _mm256_and_si256(x, c7f);
        *nan = _mm256_cmpeq_epi16(em, c7f);
        h = _mm256_or_si256(sign, _mm256_slli_epi16(em, 7));
        /* float16 0x7F80 widens to float32 0x7FF00000: torch's float32 bits of e4m3fn NaN */
        h = _mm256_blendv_epi8(h, _mm256_or_si256(sign, _mm256_set1_epi16(0x7F80)), *nan);
    } else {
        h = _mm256_slli_epi16(x, 8);
        /* exponent all ones and a non-zero mantissa: |h| > 0x7C00 */
        *nan = _mm256_cmpgt_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7FFF)), _mm256_set1_epi16(0x7C00));
    }
    *lo = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), vs);
    *hi = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), vs);
}

/* the upper half of x rounded to nearest even (NaN lanes are patched by the caller) */
static inline __m256i bf16_rne(__m256 v) {
    __m256i x = _mm256_castps_si256(v);
    __m256i t = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(t, _mm256_set1_epi32(0x7FFF)), x), 16);
}

static inline void store16(void *out, __m256 lo, __m256 hi, __m256i nan, int fout) {
    if (fout == 0 || fout == F32_DIRECT) {
        _mm256_storeu_ps((float *)out, lo);
        _mm256_storeu_ps((float *)out + 8, hi);
    } else if (fout == 1 || fout == BF16_DIRECT) {
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_rne(lo), bf16_rne(hi)), 0xD8);
        if (fout == 1)
            p = _mm256_or_si256(p, nan); /* NaN -> 0xFFFF */
        else
            p = _mm256_blendv_epi8(p, _mm256_set1_epi16(0x7FC0), nan);
        _mm256_storeu_si256((__m256i *)out, p);
    } else {
        const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        _mm_storeu_si128((__m128i *)out, _mm256_cvtps_ph(lo, mode));
        _mm_storeu_si128((__m128i *)out + 1, _mm256_cvtps_ph(hi, mode));
    }
}

static inline __attribute__((always_inline)) void seg_simd(const uint8_t *q, void *out, int64_t n, float s,
                                                           const int fin, const int fout) {
    const int64_t size = fout == 0 || fout == F32_DIRECT ? 4 : 2;
    __m256 vs = _mm256_set1_ps(fin == 0 ? s * 256.0f : s);
    __m256 lo, hi;
    __m256i nan;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        widen16(_mm_loadu_si128((const __m128i *)(q + i)), fin, vs, &lo, &hi, &nan);
        store16((char *)out + i * size, lo, hi, nan, fout);
    }
    if (i < n) { /* the tail through a 16-element scratch: the same instructions, fewer bytes */
        uint8_t in[16] = {0};
        float scratch[16];
        memcpy(in, q + i, (size_t)(n - i));
        widen16(_mm_loadu_si128((const __m128i *)in), fin, vs, &lo, &hi, &nan);
        store16(scratch, lo, hi, nan, fout);
        memcpy((char *)out + i * size, scratch, (size_t)((n - i) * size));
    }
}
#endif

static void segment(const uint8_t *q, void *out, int64_t n, float s, const float *table, int fin, int fout) {
#if LK_SIMD
    float a = s < 0 ? -s : s;
    if ((fin == 0 || fin == 1) && a > 0 && a < 0x1p100f) { /* false for NaN */
        /* one specialized loop per (format in, format out) */
        if (fin == 0) {
            if (fout == 0) seg_simd(q, out, n, s, 0, 0);
            else if (fout == 1) seg_simd(q, out, n, s, 0, 1);
            else if (fout == 2) seg_simd(q, out, n, s, 0, 2);
            else if (fout == F32_DIRECT) seg_simd(q, out, n, s, 0, F32_DIRECT);
            else if (fout == BF16_DIRECT) seg_simd(q, out, n, s, 0, BF16_DIRECT);
            else seg_simd(q, out, n, s, 0, F16_DIRECT);
        } else {
            if (fout == 0) seg_simd(q, out, n, s, 1, 0);
            else if (fout == 1) seg_simd(q, out, n, s, 1, 1);
            else if (fout == 2) seg_simd(q, out, n, s, 1, 2);
            else if (fout == F32_DIRECT) seg_simd(q, out, n, s, 1, F32_DIRECT);
            else if (fout == BF16_DIRECT) seg_simd(q, out, n, s, 1, BF16_DIRECT);
            else seg_simd(q, out, n, s, 1, F16_DIRECT);
        }
        return;
    }
#endif
    seg_table(q, out, n, s, table, fout);
}

static int bad_args(int fin, int fout) { return fin < 0 || fin > 2 || fout < 0 || fout > 2; }

/* n codes, one scale: out[i] = (v(q[i]) * s).to(out); direct: out[i] = v(q[i]).to(out) */
int lk_decode_flat(const uint8_t *q, void *out, int64_t n, float s, const float *table, int fin, int fout,
                   int direct) {
    if (bad_args(fin, fout)) return -1;
    if (direct) {
        fout += F32_DIRECT; /* 0, 1, 2 -> F32_DIRECT, BF16_DIRECT, F16_DIRECT */
        s = 1.0f;
    }
    segment(q, out, n, s, table, fin, fout);
    return 0;
}

/* rows [r0, r1) of a row-major (rows x cols) code matrix; element (r, c) is scaled by
 * grid[(r / b0) * grid_cols + c / b1]: per channel is b0 = 1, b1 = cols; blocks are (b0, b1) */
int lk_decode_grid(const uint8_t *q, void *out, int64_t r0, int64_t r1, int64_t cols, const float *grid,
                   int64_t b0, int64_t b1, int64_t grid_cols, const float *table, int fin, int fout) {
    if (bad_args(fin, fout) || b0 < 1 || b1 < 1) return -1;
    const int64_t size = fout == 0 ? 4 : 2;
    for (int64_t r = r0; r < r1; r++) {
        const float *srow = grid + (r / b0) * grid_cols;
        const uint8_t *qrow = q + r * cols;
        char *orow = (char *)out + r * cols * size;
        for (int64_t c = 0, g = 0; c < cols; c += b1, g++) {
            int64_t n = cols - c < b1 ? cols - c : b1;
            segment(qrow + c, orow + c * size, n, srow[g], table, fin, fout);
        }
    }
    return 0;
}

/* ---- quantize: amax and encode, bit-exact with torch's (w.float() / s).clamp(-m, m).to(fp8) ----
 *
 * Sources in: 0 = float32, 1 = bfloat16, 2 = float16 (the formats-out numbering above).
 * Out: 0 = float8_e4m3fn, 1 = float8_e5m2, 2 = int8. The fp8 rounding is torch's own (c10's
 * fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value: round to nearest even, subnormals by a
 * float addition); int8 is ``round_half_even(w / s).clamp(-top, top)``. The grid of amax values / scales is laid out as in lk_decode_grid.
 */

static inline float load_f32(const void *src, int64_t i, int fmt) {
    if (fmt == 0) return ((const float *)src)[i];
    uint16_t h = ((const uint16_t *)src)[i];
    if (fmt == 1) return bits_f32((uint32_t)h << 16);
    /* float16: exact widening (normal, subnormal, inf, NaN) */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) return bits_f32(sign | 0x7F800000 | (m << 13) | (m ? 0x400000 : 0));
    if (e == 0) {
        float v = (float)m * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

static inline uint8_t e4m3_from_f32(float f) {
    uint32_t x = f32_bits(f), sign = x & 0x80000000u, r;
    x ^= sign;
    if (x >= (1087u << 20)) {
        r = 0x7F;
    } else if (x < (121u << 23)) {
        r = (uint8_t)(f32_bits(bits_f32(x) + bits_f32(141u << 23)) - (141u << 23));
    } else {
        r = (uint8_t)((x + ((uint32_t)(7 - 127) << 23) + 0x7FFFF + ((x >> 20) & 1)) >> 20);
    }
    return (uint8_t)(r | (sign >> 24));
}

static inline uint8_t e5m2_from_f32(float f) {
    uint32_t x = f32_bits(f), sign = x & 0x80000000u, r;
    x ^= sign;
    if (x >= (143u << 23)) {
        r = x > (255u << 23) ? 0x7F : 0x7C;
    } else if (x < (113u << 23)) {
        r = (uint8_t)(f32_bits(bits_f32(x) + bits_f32(134u << 23)) - (134u << 23));
    } else {
        r = (uint8_t)((x + ((uint32_t)(15 - 127) << 23) + 0xFFFFF + ((x >> 21) & 1)) >> 21);
    }
    return (uint8_t)(r | (sign >> 24));
}

/* largest |w| of n values: the largest magnitude bit pattern (NaN patterns sort above inf) */
static float seg_amax(const void *src, int64_t n, int fmt) {
    if (fmt == 0) {
        const uint32_t *s = (const uint32_t *)src;
        uint32_t m = 0;
        for (int64_t i = 0; i < n; i++) {
            uint32_t v = s[i] & 0x7FFFFFFFu;
            m = v > m ? v : m;
        }
        return bits_f32(m);
    }
    const uint16_t *s = (const uint16_t *)src;
    uint16_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        uint16_t v = s[i] & 0x7FFF;
        m = v > m ? v : m;
    }
    return fmt == 1 ? bits_f32((uint32_t)m << 16) : load_f32(&m, 0, 2);
}

/* rows [r0, r1): grid[(r / b0) * grid_cols + c / b1] = max(itself, |w[r, c]|) */
int lk_amax_grid(const void *src, int fmt, int64_t r0, int64_t r1, int64_t cols, float *grid, int64_t b0,
                 int64_t b1, int64_t grid_cols) {
    if (fmt < 0 || fmt > 2 || b0 < 1 || b1 < 1) return -1;
    const int64_t size = fmt == 0 ? 4 : 2;
    for (int64_t r = r0; r < r1; r++) {
        float *grow = grid + (r / b0) * grid_cols;
        const char *row = (const char *)src + r * cols * size;
        for (int64_t c = 0, g = 0; c < cols; c += b1, g++) {
            int64_t n = cols - c < b1 ? cols - c : b1;
            float m = seg_amax(row + c * size, n, fmt);
            if (!(m <= grow[g])) grow[g] = m; /* NaN wins */
        }
    }
    return 0;
}

static void seg_encode_scalar(const void *src, int fmt, uint8_t *q, int64_t n, float s, float top, int fp8) {
    for (int64_t i = 0; i < n; i++) {
        float v = load_f32(src, i, fmt) / s;
        v = v < -top ? -top : (v > top ? top : v); /* clamp as torch's: NaN stays NaN */
        if (fp8 == 2) {
            /* int8: round half to even (adding and taking away 1.5 * 2^23 rounds a float of
             * magnitude below 2^22 to an integer in the default rounding mode); clamping to the
             * integer +-top first gives the same as rounding first */
            volatile float r = v + 12582912.0f;
            q[i] = (uint8_t)(int8_t)(int)(r - 12582912.0f);
        } else {
            q[i] = fp8 == 0 ? e4m3_from_f32(v) : e5m2_from_f32(v);
        }
    }
}

#if LK_SIMD
static inline __m256 load8(const void *src, int64_t i, int fmt) {
    if (fmt == 0) return _mm256_loadu_ps((const float *)src + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
    if (fmt == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static inline __m256i e4m3_from_f32x8(__m256 v) {
    __m256i x = _mm256_castps_si256(v);
    __m256i sign = _mm256_and_si256(x, _mm256_set1_epi32((int)0x80000000u));
    __m256i ax = _mm256_xor_si256(x, sign);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(ax, 20), _mm256_set1_epi32(1));
    __m256i rn = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(ax, _mm256_set1_epi32((int)0xC407FFFFu)), odd), 20);
    __m256 dm = _mm256_castsi256_ps(_mm256_set1_epi32(141 << 23));
    __m256i rd = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(ax), dm)),
                                  _mm256_castps_si256(dm));
    __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), ax);
    __m256i big = _mm256_cmpgt_epi32(ax, _mm256_set1_epi32((1087 << 20) - 1));
    __m256i r = _mm256_blendv_epi8(rn, rd, small);
    r = _mm256_blendv_epi8(_mm256_and_si256(r, _mm256_set1_epi32(0xFF)), _mm256_set1_epi32(0x7F), big);
    return _mm256_or_si256(r, _mm256_srli_epi32(sign, 24));
}

static inline __attribute__((always_inline)) void seg_encode_simd(const void *src, const int fmt, uint8_t *q,
                                                                   int64_t n, float s, float top, const int fp8) {
    const int64_t size = fmt == 0 ? 4 : 2;
    const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(top), lo = _mm256_set1_ps(-top);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i r[4];
        for (int k = 0; k < 4; k++) {
            __m256 v = _mm256_div_ps(load8(src, i + 8 * k, fmt), vs);
            /* torch's clamp: max then min, a NaN operand kept (vmaxps returns its second operand) */
            v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
            if (fp8 == 2) /* int8: round half to even, then the integer */
                r[k] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            else
                r[k] = e4m3_from_f32x8(v);
        }
        __m256i lo16 = _mm256_packs_epi32(r[0], r[1]), hi16 = _mm256_packs_epi32(r[2], r[3]);
        __m256i b = fp8 == 2 ? _mm256_packs_epi16(lo16, hi16) : _mm256_packus_epi16(lo16, hi16);
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(b, order));
    }
    seg_encode_scalar((const char *)src + i * size, fmt, q + i, n - i, s, top, fp8);
}

/* one specialized loop per (source format, e4m3fn or int8); e5m2 by the scalar loop */
static void seg_encode(const void *src, int fmt, uint8_t *q, int64_t n, float s, float top, int fp8) {
    if (fp8 == 1) {
        seg_encode_scalar(src, fmt, q, n, s, top, fp8);
    } else if (fp8 == 0) {
        if (fmt == 0) seg_encode_simd(src, 0, q, n, s, top, 0);
        else if (fmt == 1) seg_encode_simd(src, 1, q, n, s, top, 0);
        else seg_encode_simd(src, 2, q, n, s, top, 0);
    } else {
        if (fmt == 0) seg_encode_simd(src, 0, q, n, s, top, 2);
        else if (fmt == 1) seg_encode_simd(src, 1, q, n, s, top, 2);
        else seg_encode_simd(src, 2, q, n, s, top, 2);
    }
}
#else
#define seg_encode seg_encode_scalar
#endif

/* rows [r0, r1): q[r, c] = fp8(clamp(w[r, c] / grid[(r / b0) * grid_cols + c / b1], -top, top)) */
int lk_encode_grid(const void *src, int fmt, uint8_t *q, int64_t r0, int64_t r1, int64_t cols, const float *grid,
                   int64_t b0, int64_t b1, int64_t grid_cols, float top, int fp8) {
    if (fmt < 0 || fmt > 2 || fp8 < 0 || fp8 > 2 || b0 < 1 || b1 < 1 || (fp8 == 2 && !(top <= 127.0f))) return -1;
    const int64_t size = fmt == 0 ? 4 : 2;
    for (int64_t r = r0; r < r1; r++) {
        const float *srow = grid + (r / b0) * grid_cols;
        const char *row = (const char *)src + r * cols * size;
        for (int64_t c = 0, g = 0; c < cols; c += b1, g++) {
            int64_t n = cols - c < b1 ? cols - c : b1;
            seg_encode(row + c * size, fmt, q + r * cols + c, n, srow[g], top, fp8);
        }
    }
    return 0;
}
