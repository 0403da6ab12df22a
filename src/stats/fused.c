/* One pass over each layer's gradient and weights per optimizer step, for float32 CPU tensors.
 *
 * grad_pass  (before the step): per layer, the gradient's sum and sum of squares shifted by its first entry
 *            c (mean and variance without cancellation: a layer's spread may be far below its mean), its
 *            plain sum of squares (the norm), max |g|, number of non-zero, of non-finite and of NaN entries;
 *            and, when `copy` is set, a copy of the weights into `prev` (the optimizer changes them in place),
 *            block by block. The caller leaves it unset when `prev` already holds these weights.
 * weight_pass (after the step): the same shifted sums and sum of squares of the weights, and the sum of
 *            squares of (W - prev), the step actually taken; then W goes into `prev` in the same loop, while
 *            its lines are in cache, so that the next step's grad_pass need not read the weights at all
 *            (4 streams over memory per step instead of 5, and no cold writes).
 * add_squares (after backward): adds each back-propagated signal's sum of squares to a float64 row.
 * act_pass   (after the step): per layer, the activation output's count, shifted sums and number of
 *            saturated entries, where f'(s) < limit, with f' computed from the output as the registry
 *            computes it (ReLU: f' = 0 where the output is 0; sigmoid: p - p*p; tanh: 1 - t*t).
 *
 * Sums run in float32 lanes over blocks of BLOCK entries (vectorised) and are added up in float64 between
 * blocks, so their error does not grow with the layer's size. No -ffast-math: NaN and Inf must propagate
 * into the sums; they are counted from the bits, which the compiler cannot assume away.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK 1024

/* output columns: src/stats/reductions.py FUSED_GRAD_SUMS, FUSED_WEIGHT_SUMS and FUSED_ACT_SUMS */
enum { G_SHIFT, G_SUM, G_SUM_SQ, G_SQ, G_ABSMAX, G_NONZERO, G_NONFINITE, G_NAN, G_WIDTH };
enum { W_SHIFT, W_SUM, W_SUM_SQ, W_SQ, W_STEP_SQ, W_WIDTH };
enum { A_COUNT, A_SHIFT, A_SUM, A_SUM_SQ, A_SATURATED, A_WIDTH };
enum { IDENTITY, RELU, SIGMOID, TANH };  /* kernel_kind in src/models/registry.py */

static inline int32_t bits_of(float x) { int32_t u; memcpy(&u, &x, sizeof u); return u; }

static void grad_one(const float *restrict g, const float *restrict w, float *restrict prev, int64_t n,
                     int32_t copy, double *out) {
    const float c = n ? g[0] : 0;
    double sum = 0, sum_sq = 0, sq = 0;
    int32_t absmax = 0;  /* the bits of max |g|: non-negative floats order like their bits, NaN above Inf */
    int64_t nonzero = 0, nonfinite = 0, nan = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
        float s = 0, sc = 0, q = 0;
        int32_t m = absmax, nz = 0, nf = 0, nn = 0;
        for (int64_t j = start; j < end; j++) {
            float x = g[j];
            int32_t a = bits_of(x) & 0x7fffffff;  /* |x| as bits */
            float d = x - c;
            s += d;
            sc += d * d;
            q += x * x;
            m = a > m ? a : m;
            nz += a != 0;
            nf += a >= 0x7f800000;  /* exponent all ones: Inf or NaN */
            nn += a > 0x7f800000;   /* and a non-zero mantissa: NaN */
        }
        if (copy)  /* the weights before the step */
            memcpy(prev + start, w + start, (size_t)(end - start) * sizeof *w);
        sum += s; sum_sq += sc; sq += q; absmax = m;
        nonzero += nz; nonfinite += nf; nan += nn;
    }
    float amax;
    memcpy(&amax, &absmax, sizeof amax);
    out[G_SHIFT] = c;
    out[G_SUM] = sum;
    out[G_SUM_SQ] = sum_sq;
    out[G_SQ] = sq;
    out[G_ABSMAX] = nan ? NAN : amax;
    out[G_NONZERO] = (double)nonzero;
    out[G_NONFINITE] = (double)nonfinite;
    out[G_NAN] = (double)nan;
}

static void weight_one(const float *restrict w, float *restrict prev, int64_t n, double *out) {
    const float c = n ? w[0] : 0;
    double sum = 0, sum_sq = 0, sq = 0, step = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
        float s = 0, sc = 0, q = 0, d2 = 0;
        for (int64_t j = start; j < end; j++) {
            float x = w[j], d = x - c, u = x - prev[j];
            s += d;
            sc += d * d;
            q += x * x;
            d2 += u * u;
            prev[j] = x;
        }
        sum += s; sum_sq += sc; sq += q; step += d2;
    }
    out[W_SHIFT] = c;
    out[W_SUM] = sum;
    out[W_SUM_SQ] = sum_sq;
    out[W_SQ] = sq;
    out[W_STEP_SQ] = step;
}

/* The kind is a constant in each caller below, so each gets its own vectorised loop. */
static inline void act_loop(const float *restrict a, int64_t n, int kind, float limit, double *out) {
    const float c = n ? a[0] : 0;
    double sum = 0, sum_sq = 0;
    int64_t saturated = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n;
        float s = 0, sc = 0;
        int32_t sat = 0;
        for (int64_t j = start; j < end; j++) {
            float x = a[j], d = x - c;
            s += d;
            sc += d * d;
            if (kind == RELU) sat += x == 0;
            else if (kind == SIGMOID) sat += x - x * x < limit;
            else if (kind == TANH) sat += 1.0f - x * x < limit;
        }
        sum += s; sum_sq += sc; saturated += sat;
    }
    out[A_COUNT] = (double)n;
    out[A_SHIFT] = c;
    out[A_SUM] = sum;
    out[A_SUM_SQ] = sum_sq;
    out[A_SATURATED] = (double)saturated;
}

/* out: [layers, G_WIDTH] doubles */
void grad_pass(int64_t layers, const float **g, const float **w, float **prev, const int64_t *n, int32_t copy,
               double *out) {
    for (int64_t i = 0; i < layers; i++)
        grad_one(g[i], w[i], prev[i], n[i], copy, out + i * G_WIDTH);
}

/* out[i] += sum of x[i]^2 */
void add_squares(int64_t layers, const float **x, const int64_t *n, double *out) {
    for (int64_t i = 0; i < layers; i++) {
        const float *restrict v = x[i];
        double total = 0;
        for (int64_t start = 0; start < n[i]; start += BLOCK) {
            int64_t end = start + BLOCK < n[i] ? start + BLOCK : n[i];
            float q = 0;
            for (int64_t j = start; j < end; j++)
                q += v[j] * v[j];
            total += q;
        }
        out[i] += total;
    }
}

/* out: [layers, A_WIDTH] doubles; kinds and limits per layer */
void act_pass(int64_t layers, const float **a, const int64_t *n, const int32_t *kinds, const float *limits,
              double *out) {
    for (int64_t i = 0; i < layers; i++) {
        double *o = out + i * A_WIDTH;
        switch (kinds[i]) {
            case RELU: act_loop(a[i], n[i], RELU, limits[i], o); break;
            case SIGMOID: act_loop(a[i], n[i], SIGMOID, limits[i], o); break;
            case TANH: act_loop(a[i], n[i], TANH, limits[i], o); break;
            default: act_loop(a[i], n[i], IDENTITY, limits[i], o);
        }
    }
}

/* out: [layers, W_WIDTH] doubles */
void weight_pass(int64_t layers, const float **w, float **prev, const int64_t *n, double *out) {
    for (int64_t i = 0; i < layers; i++)
        weight_one(w[i], prev[i], n[i], out + i * W_WIDTH);
}

