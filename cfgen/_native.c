/* cfgen's fused CPU kernels: counter-based Gumbel noise and the hindsight posterior.
 *
 * The twin of the torch code in noise.py and _ieee.py: the same IEEE-754 basic
 * operations in the same order, compiled with -ffp-contract=off (no fused
 * multiply-add) and without -ffast-math, so every value is bit-identical to
 * the eager torch path. Written with GCC/Clang vector extensions, eight lanes
 * at a time, so the compiler emits SIMD code on any target without intrinsics.
 */
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

#define LN2_HI 0x1.62e4p-1f
#define LN2_LO 0x1.7f7d1cp-20f
#define LOG2E 0x1.715476p+0f
#define C3 0x1.555556p-2f
#define C5 0x1.99999ap-3f
#define C7 0x1.24924ap-3f
#define C9 0x1.c71c72p-4f
#define E2 0x1p-1f
#define E3 0x1.555556p-3f
#define E4 0x1.555556p-5f
#define E5 0x1.111112p-7f
#define E6 0x1.6c16c2p-10f
#define E7 0x1.a01a02p-13f
#define SQRT2_BITS 0x3FB504F3
#define SQRT2M1 0x1.a8279ap-2f
#define ONE_MINUS_SQRT_HALF 0x1.2bec34p-2f
#define EXP_FLOOR (-86.0f)
#define TAIL (-9.0f)
#define ROUNDER 0x1.8p23f /* (y + ROUNDER) - ROUNDER rounds |y| < 2**22 half to even, as rintf */
#define C1 0x21F0AAADu
#define C2 0x735A2D97u
#define NINF (-__builtin_inff())

static inline v8f sel(v8i mask, v8f a, v8f b) { return (v8f)((mask & (v8i)a) | (~mask & (v8i)b)); }
static inline v8f load(const float *p) { v8f x; memcpy(&x, p, sizeof x); return x; }
static inline void store(float *p, v8f x) { memcpy(p, &x, sizeof x); }
static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline v8f vmax(v8f a, v8f b) { return sel(a > b, a, b); }
static inline float hmax(v8f a) {
    float m = a[0];
    for (int j = 1; j < 8; j++) m = a[j] > m ? a[j] : m;
    return m;
}

/* log(2**e * (1 + f)), 1 + f in [sqrt(1/2), sqrt(2)] */
static inline v8f log_core(v8f f, v8i e) {
    v8f s = f / (f + 2.0f);
    v8f z = s * s;
    v8f p = (((z * C9 + C7) * z + C5) * z + C3) * z + 1.0f;
    v8f ef = __builtin_convertvector(e, v8f);
    return ef * LN2_HI + (ef * LN2_LO + (s + s) * p);
}

/* x = 2**e * (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)); x positive and normal */
static inline v8f split(v8f x, v8i *e) {
    v8i bits = (v8i)x;
    v8i m = (bits & 0x7FFFFF) | 0x3F800000;
    v8i big = m > SQRT2_BITS; /* -1 where true */
    *e = (bits >> 23) - 127 - big;
    return (v8f)(m - (big & 0x800000)) - 1.0f;
}

static inline v8f log32(v8f x) {
    v8i e;
    v8f f = split(x, &e);
    return log_core(f, e);
}

static inline v8f log1p32(v8f t) {
    v8i e;
    v8f f = split(t + 1.0f, &e);
    v8i small = t <= SQRT2M1;
    return log_core(sel(small, t, f), e & ~small);
}

static inline v8f exp32(v8f x) {
    v8i under = x < EXP_FLOOR;
    v8f xc = sel(under, splat(EXP_FLOOR), x);
    v8f n = (xc * LOG2E + ROUNDER) - ROUNDER;
    v8f r = (xc - n * LN2_HI) - n * LN2_LO;
    v8f p = (((((r * E7 + E6) * r + E5) * r + E4) * r + E3) * r + E2) * r + 1.0f;
    p = p * r + 1.0f;
    v8f scale = (v8f)((__builtin_convertvector(n, v8i) + 127) << 23);
    return sel(under, splat(0.0f), p * scale);
}

static inline v8u mix32(v8u x) {
    x ^= x >> 16;
    x *= C1;
    x ^= x >> 15;
    x *= C2;
    return x ^ (x >> 15);
}

static inline v8f gumbel_from_bits(v8u x) {
    v8f t = (__builtin_convertvector((v8i)(x & 0x7FFFFFFFu), v8f) + 0.5f) * 0x1p-32f;
    v8i low = (v8i)(x >> 31) == 0;
    v8i series = low & (t <= ONE_MINUS_SQRT_HALF);
    v8i e;
    v8f f = split(sel(low, 1.0f - t, t), &e);
    v8f en = -log_core(sel(series, -t, f), e & ~series);
    return -log32(en);
}

static const v8u LANES = {0, 1, 2, 3, 4, 5, 6, 7};

static inline v8f gumbel(uint32_t k1, uint32_t k2, uint32_t v) {
    return gumbel_from_bits(mix32(mix32((LANES + v) ^ k1) ^ k2));
}

static inline v8f truncated(v8f a, v8f g, float m) {
    v8f z = (a + g) - m;
    /* Far below the maximum the correction softplus(z) <= e^z (1 + 2**-20) is under a quarter
     * ulp of g, so the formula below rounds to g: with |g| in [2**k, 2**(k+1)), that holds
     * when z log2(e) < k - 25.1 (0.1 covers exp32's and the product's rounding). Where every
     * lane is that far down, skip the arithmetic; the result is the same bits. */
    v8f k = __builtin_convertvector((((v8i)g >> 23) & 0xFF) - 127, v8f);
    v8i far = z * LOG2E < k - 25.1f, tail = z <= TAIL;
    int all_far = 1, all_tail = 1;
    for (int j = 0; j < 8; j++) {
        all_far &= far[j] != 0;
        all_tail &= tail[j] != 0;
    }
    if (all_far) return g;
    v8f az = (v8f)((v8i)z & 0x7FFFFFFF);
    v8f t = exp32(-az);
    v8f series = ((t * C3 - 0.5f) * t + 1.0f) * t; /* log1p(t) for t = e^z <= e^-9 */
    if (all_tail) return g - series;
    return g - sel(tail, series, sel(z > 0.0f, z, splat(0.0f)) + log1p32(t));
}

/* Row tails: copy into an 8-lane buffer padded with `pad`, so one code path does all. */
static inline v8f load_tail(const float *p, int64_t n, float pad) {
    float buf[8] = {pad, pad, pad, pad, pad, pad, pad, pad};
    memcpy(buf, p, (size_t)n * sizeof(float));
    return load(buf);
}

static inline void store_tail(float *p, int64_t n, v8f x) {
    float buf[8];
    store(buf, x);
    memcpy(p, buf, (size_t)n * sizeof(float));
}

/* Ask for transparent huge pages on the 2 MiB-aligned interior of a fresh output buffer:
 * faulting in 100 MB of 4 KiB pages costs more than a third of the posterior's arithmetic. */
void cfgen_advise_huge(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

/* One row of Gumbel noise for keys (a, b); two independent chains per iteration hide latency. */
static void gumbel_row(uint32_t a, uint32_t b, int64_t vocab, float *o) {
    int64_t v = 0;
    for (; v + 16 <= vocab; v += 16) {
        v8f g0 = gumbel(a, b, (uint32_t)v), g1 = gumbel(a, b, (uint32_t)v + 8);
        store(o + v, g0);
        store(o + v + 8, g1);
    }
    for (; v + 8 <= vocab; v += 8) store(o + v, gumbel(a, b, (uint32_t)v));
    if (v < vocab) store_tail(o + v, vocab - v, gumbel(a, b, (uint32_t)v));
}

/* out[r, v] = Gumbel noise for row keys (k1[r], k2[r]) and token v. */
void cfgen_gumbel(const int64_t *k1, const int64_t *k2, int64_t rows, int64_t vocab, float *out) {
    for (int64_t r = 0; r < rows; r++) gumbel_row((uint32_t)k1[r], (uint32_t)k2[r], vocab, out + r * vocab);
}

/* zmax = max_v z_v and ls = log32(fixed-point sum of exp32(z_v - zmax)): log_softmax32's normaliser. */
static void row_normaliser(const float *zr, int64_t vocab, int32_t bits, float *zmax_out, float *ls_out) {
    /* trunc(p * 2**bits) = hi * 2**(bits - 23) + trunc(frac(p * 2**23) * 2**(bits - 23)) with
     * hi = trunc(p * 2**23): the integer the torch code's int64 conversion gives, in int32 lanes. */
    const float rest = (float)(1ll << (bits - 23));
    const float down = 1.0f / (float)(1ll << bits);
    const int64_t body = vocab - vocab % 8, tail = vocab - body;
    v8f best = splat(NINF);
    for (int64_t v = 0; v < body; v += 8) best = vmax(best, load(zr + v));
    if (tail) best = vmax(best, load_tail(zr + body, tail, NINF));
    const float zmax = hmax(best);
    int64_t total = 0;
    for (int64_t lo = 0; lo < vocab; lo += 1024) { /* int32 lanes hold 128 terms below 2**23 */
        v8i hi_acc = {0}, lo_acc = {0};
        const int64_t end = lo + 1024 < vocab ? lo + 1024 : vocab;
        for (int64_t v = lo; v < end; v += 8) {
            v8f p = exp32((v + 8 <= end ? load(zr + v) : load_tail(zr + v, end - v, NINF)) - zmax) * 0x1p23f;
            v8i hi = __builtin_convertvector(p, v8i);
            hi_acc += hi;
            lo_acc += __builtin_convertvector((p - __builtin_convertvector(hi, v8f)) * rest, v8i);
        }
        for (int j = 0; j < 8; j++) total += ((int64_t)hi_acc[j] << (bits - 23)) + lo_acc[j];
    }
    *zmax_out = zmax;
    *ls_out = log32(splat((float)(double)total * down))[0];
}

/* out = log_softmax32(z) row by row: (z - zmax) - ls, -inf where z is -inf. */
void cfgen_log_softmax(const float *z, int64_t rows, int64_t vocab, int32_t bits, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = z + r * vocab;
        float *o = out + r * vocab;
        float zmax, ls;
        row_normaliser(zr, vocab, bits, &zmax, &ls);
        for (int64_t v = 0; v < vocab; v++) o[v] = (zr[v] - zmax) - ls;
    }
}

/* The hindsight posterior for rows of float32 logits z (temperature applied,
 * -inf outside the support). a = log_softmax32(z); U_v = truncated(a_v, g_v, m)
 * with g the Gumbel noise of (k1, k2); U_y = m - a_y; then U_y is lifted until
 * a_y + U_y clears the best rival by 2**-20 (relative), as posterior.py does.
 * status[r] = 1 when y is outside the support (the row is left unwritten). */
void cfgen_posterior(const float *z, const int64_t *y, const int64_t *k1, const int64_t *k2, const float *m,
                     int64_t rows, int64_t vocab, int32_t bits, float *out, int32_t *status) {
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = z + r * vocab;
        float *o = out + r * vocab;
        const int64_t body = vocab - vocab % 8, tail = vocab - body;

        float zmax, ls;
        row_normaliser(zr, vocab, bits, &zmax, &ls);

        const int64_t yr = y[r];
        const float ay = (zr[yr] - zmax) - ls;
        status[r] = ay == NINF;
        if (status[r]) continue;
        /* the noise first, then its truncation: one fused loop spills registers and is ~20% slower */
        const float mr = m[r];
        gumbel_row((uint32_t)k1[r], (uint32_t)k2[r], vocab, o);
        for (int64_t v = 0; v < body; v += 8) store(o + v, truncated((load(zr + v) - zmax) - ls, load(o + v), mr));
        if (tail)
            store_tail(o + body, tail,
                       truncated((load_tail(zr + body, tail, NINF) - zmax) - ls, load_tail(o + body, tail, 0.0f), mr));

        /* the best rival of y: max over v != y of a_v + U_v (y's slot masked for the pass) */
        o[yr] = NINF;
        v8f best = splat(NINF);
        for (int64_t v = 0; v < body; v += 8) best = vmax(best, ((load(zr + v) - zmax) - ls) + load(o + v));
        if (tail)
            best = vmax(best, ((load_tail(zr + body, tail, NINF) - zmax) - ls) + load_tail(o + body, tail, NINF));
        const float rival = hmax(best);

        float uy = mr - ay;
        const float scale = rival < 0.0f ? -rival : rival;
        const float target = rival + (scale > 1.0f ? scale : 1.0f) * 0x1p-20f;
        for (int it = 0; it < 64 && ay + uy < target; it++) {
            uint32_t u;
            memcpy(&u, &uy, 4);
            u = uy > 0.0f ? u + 1u : uy == 0.0f ? 1u : u - 1u; /* nextafterf(uy, +inf), uy finite */
            float next;
            memcpy(&next, &u, 4);
            const float lifted = target - ay;
            uy = lifted > next ? lifted : next;
        }
        o[yr] = uy;
    }
}
