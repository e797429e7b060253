/* The CPU hot path of the MoE layer, float32: fused dispatch -> experts -> combine on one rank
 * (EP = 1; also each chunk's experts in the EP > 1 pipeline), the sending side's row movement of
 * that pipeline, and the router's top-k selection.
 *
 * The Python side (dispatch/local.py, dispatch/native.py) plans the chunks and owns every buffer;
 * this file only runs the loops that Python would otherwise drive op by op. Why it exists: with
 * many narrow experts (64 experts of width 64) one layer step makes ~400 GEMM calls and ~300
 * gathers, scatters and elementwise passes on ~1 MB blocks, and the per-op cost of issuing them
 * from Python was about a tenth of the step. Here each op costs one C call, the activation, its
 * combine-weight scaling and the weight-gradient dot product share one pass over a cached block,
 * and the GEMMs go straight to the BLAS that torch links (its Fortran `sgemm_`, passed in once).
 *
 * Notation as in dispatch/local.py: T tokens, D hidden, H first-projection width (2F for SwiGLU),
 * F expert width, rows sorted by expert. A chunk is [start, stop) of rows with its pieces
 * (expert, first row, rows), from permute.expert_chunks.
 */
#include <stdint.h>
#include <string.h>

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);
static sgemm_fn sgemm_ptr;

void tm_set_sgemm(void *fn) { sgemm_ptr = (sgemm_fn)fn; }

int tm_abi_version(void) { return 2; }

/* Row-major C[M, N] = op(A) op(B) + beta C. A row-major matrix is its transpose in column-major,
 * so this is the column-major product C^T = op(B)^T op(A)^T with the operands swapped. */
static void mm(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B,
               int ldb, float beta, float *C, int ldc) {
    const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
    const float one = 1.0f;
    sgemm_ptr(&b, &a, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* Load-time check that `sgemm_` is the BLAS we think (32-bit integers, column-major): all four
 * transpose cases of mm on small odd shapes against a plain loop. Returns the largest error. */
float tm_check_gemm(void) {
    enum { M = 5, N = 3, K = 7 };
    float A[M * K], B[K * N], C[M * N], At[K * M], Bt[N * K], err = 0.0f;
    for (int i = 0; i < M * K; i++) A[i] = (float)((i * 7) % 11) - 5.0f;
    for (int i = 0; i < K * N; i++) B[i] = (float)((i * 5) % 13) - 6.0f;
    for (int i = 0; i < M; i++)
        for (int k = 0; k < K; k++) At[k * M + i] = A[i * K + k];
    for (int k = 0; k < K; k++)
        for (int j = 0; j < N; j++) Bt[j * K + k] = B[k * N + j];
    for (int t = 0; t < 4; t++) {
        const int ta = t & 1, tb = t >> 1;
        for (int i = 0; i < M * N; i++) C[i] = 1.0f;            /* beta = 1 keeps this */
        mm(ta, tb, M, N, K, ta ? At : A, ta ? M : K, tb ? Bt : B, tb ? K : N, 1.0f, C, N);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float want = 1.0f;
                for (int k = 0; k < K; k++) want += A[i * K + k] * B[k * N + j];
                const float d = C[i * N + j] - want;
                err = (d < 0 ? -d : d) > err ? (d < 0 ? -d : d) : err;
            }
    }
    return err;
}

/* exp for the activations, written so the compiler vectorises the loops that call it (libm's
 * expf is a call per element). Cephes' range reduction and polynomial: ~1 ulp on [-87, 88]. */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* tanh from exp for |u| >= 0.625 (e in (0, 1], nothing overflows) and Cephes' odd polynomial
 * below, where 1 - e would cancel; both are computed and one is selected, which vectorises. */
static inline float tanh_f(float u) {
    const float au = u < 0.0f ? -u : u;
    const float e = exp_f(-2.0f * au);
    float t = (1.0f - e) / (1.0f + e);
    t = u < 0.0f ? -t : t;
    const float z = u * u;
    float q = -5.70498872745e-3f;
    q = q * z + 2.06390887954e-2f;
    q = q * z - 5.37397155531e-2f;
    q = q * z + 1.33314422036e-1f;
    q = q * z - 3.33332819422e-1f;
    q = q * z * u + u;
    return au < 0.625f ? q : t;
}

#define GELU_B 0.7978845608028654f          /* sqrt(2 / pi) */
#define GELU_K 0.044715f

/* The activation keeps, besides its input h, its one transcendental per element, u: the tanh
 * of GELU's tanh form, or the sigmoid of SwiGLU's gate. The activation a and its derivative are
 * then a few multiplies from (h, u), so the backward evaluates no exp: [N, F] of u is stored in
 * place of [N, F] of a, the same memory. */

static inline float gelu_u(float x) { return tanh_f(GELU_B * (x + GELU_K * x * x * x)); }
static inline float gelu_a(float x, float u) { return 0.5f * x * (1.0f + u); }
static inline float silu_u(float g) { return 1.0f / (1.0f + exp_f(-g)); }

/* one row: u from h, s = w * act(h) (the combine weight applied in the narrow space) */
static void act_forward_row(int act, int F, const float *restrict h, float *restrict u,
                            float *restrict s, float w) {
    if (act == 0) {                                 /* GELU, tanh form */
        for (int f = 0; f < F; f++) {
            const float x = h[f], t = gelu_u(x);
            u[f] = t;
            s[f] = w * gelu_a(x, t);
        }
    } else {                                        /* SwiGLU: h = [gate | up] */
        const float *restrict up = h + F;
        for (int f = 0; f < F; f++) {
            const float g = h[f], sg = silu_u(g);
            u[f] = sg;
            s[f] = w * (g * sg * up[f]);
        }
    }
}

/* one row: s = w * act(h), from the kept (h, u) */
static void act_scaled_row(int act, int F, const float *restrict h, const float *restrict u,
                           float *restrict s, float w) {
    if (act == 0) {
        for (int f = 0; f < F; f++) s[f] = w * gelu_a(h[f], u[f]);
    } else {
        const float *restrict up = h + F;
        for (int f = 0; f < F; f++) s[f] = w * (h[f] * u[f] * up[f]);
    }
}

/* one row, given ga = dL/d(unweighted expert output) @ W2^T: returns dL/dw = <ga, act(h)> and
 * writes gh = d act(h)/dh applied to w * ga */
static float act_backward_row(int act, int F, const float *restrict h, const float *restrict u,
                              const float *restrict ga, float w, float *restrict gh) {
    float dot = 0.0f;
    if (act == 0) {
        for (int f = 0; f < F; f++) {
            const float x = h[f], x2 = x * x, t = u[f];
            dot += ga[f] * gelu_a(x, t);
            const float d = 0.5f * (1.0f + t) +
                            0.5f * x * (1.0f - t * t) * GELU_B * (1.0f + 3.0f * GELU_K * x2);
            gh[f] = w * ga[f] * d;
        }
    } else {
        const float *restrict up = h + F;
        float *restrict gh_up = gh + F;
        for (int f = 0; f < F; f++) {
            const float g = h[f], sg = u[f], silu = g * sg;
            dot += ga[f] * (silu * up[f]);
            const float gw = w * ga[f];
            gh[f] = gw * up[f] * sg * (1.0f + g * (1.0f - sg));
            gh_up[f] = gw * silu;
        }
    }
    return dot;
}

/* Rows are read (gather) or updated (scatter) by index, so the hardware prefetcher cannot see
 * the next one coming: ask for the row a few ahead, one request per cache line. */
#define PREFETCH_AHEAD 4

static inline void prefetch_row(const float *row, int64_t D, int for_write) {
    const char *p = (const char *)row;
    for (int64_t o = 0; o < D * (int64_t)sizeof(float); o += 64) {
        if (for_write)
            __builtin_prefetch(p + o, 1);
        else
            __builtin_prefetch(p + o, 0);
    }
}

static void gather_rows(float *restrict dst, const float *restrict src, const int64_t *idx,
                        int64_t n, int64_t D) {
    for (int64_t r = 0; r < n; r++) {
        if (r + PREFETCH_AHEAD < n) prefetch_row(src + idx[r + PREFETCH_AHEAD] * D, D, 0);
        memcpy(dst + r * D, src + idx[r] * D, D * sizeof(float));
    }
}

static void scatter_add_rows(float *restrict dst, const float *restrict src, const int64_t *idx,
                             int64_t n, int64_t D) {
    for (int64_t r = 0; r < n; r++) {
        if (r + PREFETCH_AHEAD < n) prefetch_row(dst + idx[r + PREFETCH_AHEAD] * D, D, 1);
        float *restrict d = dst + idx[r] * D;
        const float *restrict s = src + r * D;
        for (int64_t j = 0; j < D; j++) d[j] += s[j];
    }
}

/* chunks: [n_chunks, 4] = (start, stop, first piece, end piece); pieces: [P, 3] =
 * (expert, first row, rows), rows absolute. h, u: [N, H], [N, F] kept for backward. y zeroed. */
void tm_forward(int64_t D, int64_t H, int64_t F, int act, const float *x, const float *w1,
                const float *w2, const float *wN, const int64_t *tok, int64_t n_chunks,
                const int64_t *chunks, const int64_t *pieces, float *xbuf, float *sbuf,
                float *ybuf, float *h, float *u, float *y) {
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t start = chunks[4 * c], stop = chunks[4 * c + 1];
        const int64_t p0 = chunks[4 * c + 2], p1 = chunks[4 * c + 3];
        gather_rows(xbuf, x, tok + start, stop - start, D);
        for (int64_t p = p0; p < p1; p++) {
            const int64_t e = pieces[3 * p], r = pieces[3 * p + 1], n = pieces[3 * p + 2];
            mm(0, 0, n, H, D, xbuf + (r - start) * D, D, w1 + e * D * H, H, 0.0f, h + r * H, H);
        }
        for (int64_t r = start; r < stop; r++)
            act_forward_row(act, F, h + r * H, u + r * F, sbuf + (r - start) * F, wN[r]);
        for (int64_t p = p0; p < p1; p++) {
            const int64_t e = pieces[3 * p], r = pieces[3 * p + 1], n = pieces[3 * p + 2];
            mm(0, 0, n, D, F, sbuf + (r - start) * F, F, w2 + e * F * D, D, 0.0f,
               ybuf + (r - start) * D, D);
        }
        scatter_add_rows(y, ybuf, tok + start, stop - start, D);
    }
}

/* gx zeroed; gw1, gw2 written (an expert's first GEMM writes, later ones accumulate); gwN: [N].
 * Scratch: xbuf, gbuf [rows, D], sbuf, gabuf [rows, F], ghbuf [rows, H]. seen [experts]: which
 * experts were written, zeroed before the first call; several calls (the chunks of the
 * expert-parallel pipeline) may share gw1, gw2 and seen, and the last one (finish = 1) zeroes
 * the experts that never received a row. */
void tm_backward(int64_t D, int64_t H, int64_t F, int act, int64_t n_experts, const float *x,
                 const float *w1, const float *w2, const float *wN, const int64_t *tok,
                 int64_t n_chunks, const int64_t *chunks, const int64_t *pieces, const float *h,
                 const float *u, const float *gy, float *gx, float *gw1, float *gw2, float *gwN,
                 uint8_t *seen, float *xbuf, float *gbuf, float *sbuf, float *gabuf,
                 float *ghbuf, int finish) {
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t start = chunks[4 * c], stop = chunks[4 * c + 1];
        const int64_t p0 = chunks[4 * c + 2], p1 = chunks[4 * c + 3];
        gather_rows(gbuf, gy, tok + start, stop - start, D);
        for (int64_t r = start; r < stop; r++)         /* s = w * act(h) again (not kept) */
            act_scaled_row(act, F, h + r * H, u + r * F, sbuf + (r - start) * F, wN[r]);
        for (int64_t p = p0; p < p1; p++) {
            const int64_t e = pieces[3 * p], r = pieces[3 * p + 1], n = pieces[3 * p + 2];
            const float *g = gbuf + (r - start) * D;
            mm(0, 1, n, F, D, g, D, w2 + e * F * D, D, 0.0f, gabuf + (r - start) * F, F);
            mm(1, 0, F, D, n, sbuf + (r - start) * F, F, g, D, seen[e] ? 1.0f : 0.0f,
               gw2 + e * F * D, D);
        }
        for (int64_t r = start; r < stop; r++)
            gwN[r] = act_backward_row(act, F, h + r * H, u + r * F, gabuf + (r - start) * F,
                                      wN[r], ghbuf + (r - start) * H);
        gather_rows(xbuf, x, tok + start, stop - start, D);
        for (int64_t p = p0; p < p1; p++) {
            const int64_t e = pieces[3 * p], r = pieces[3 * p + 1], n = pieces[3 * p + 2];
            const float *gh = ghbuf + (r - start) * H;
            mm(1, 0, D, H, n, xbuf + (r - start) * D, D, gh, H, seen[e] ? 1.0f : 0.0f,
               gw1 + e * D * H, H);
            mm(0, 1, n, D, H, gh, H, w1 + e * D * H, H, 0.0f, gbuf + (r - start) * D, D);
            seen[e] = 1;
        }
        scatter_add_rows(gx, gbuf, tok + start, stop - start, D);
    }
    for (int64_t e = 0; finish && e < n_experts; e++) {
        if (seen[e]) continue;
        memset(gw1 + e * D * H, 0, D * H * sizeof(float));
        memset(gw2 + e * F * D, 0, F * D * sizeof(float));
    }
}

/* Top-k of each row of scores [T, E], largest first, exact ties towards the lower index (what a
 * stable descending sort gives; NaN counts as the largest, as in torch.sort). */
static inline int beats(float a, float b) { return (a != a && b == b) || a > b; }

/* One row: a sorted list of k kept while scanning; most entries lose their one comparison. */
static void topk_row(const float *s, int64_t E, int64_t k, int64_t *id) {
    float v[256];
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        const float x = s[e];
        if (n == k && !beats(x, v[k - 1])) continue;
        int64_t i = n < k ? n++ : k - 1;              /* slot freed at the end of the list */
        while (i > 0 && beats(x, v[i - 1])) {         /* equal values stay ahead: stable */
            v[i] = v[i - 1];
            id[i] = id[i - 1];
            i--;
        }
        v[i] = x;
        id[i] = e;
    }
}

#ifdef __AVX512F__
#include <immintrin.h>
#define TOPK_LANES 16
#define TOPK_VEC_K 8
#define TOPK_VEC_E 512
/* 16 rows at a time, one row per SIMD lane, k <= 8 lists held in registers: each score is
 * inserted into the sorted list with no branch (the scalar scan above mispredicts on nearly
 * every insertion): it takes the first slot it strictly beats (so ties stay in index order) and
 * every entry from there on moves down one. Blocks holding NaN or -inf (where "greater than the -inf fill" is not enough)
 * are redone by the scalar scan. */
static void topk_avx512(const float *scores, int64_t T, int64_t E, int64_t k, int64_t *ids) {
    float blk[TOPK_VEC_E * TOPK_LANES];
    for (int64_t t0 = 0; t0 < T; t0 += TOPK_LANES) {
        const int64_t nl = T - t0 < TOPK_LANES ? T - t0 : TOPK_LANES;
        int odd = 0;
        for (int64_t l = 0; l < TOPK_LANES; l++) {
            const float *s = scores + (t0 + (l < nl ? l : 0)) * E;
            for (int64_t e = 0; e < E; e++) {
                const float x = s[e];
                odd |= !(x > -__builtin_inff());     /* NaN or -inf */
                blk[e * TOPK_LANES + l] = x;
            }
        }
        if (odd) {
            for (int64_t l = 0; l < nl; l++) topk_row(scores + (t0 + l) * E, E, k, ids + (t0 + l) * k);
            continue;
        }
        __m512 v[TOPK_VEC_K];
        __m512i id[TOPK_VEC_K];
        for (int i = 0; i < TOPK_VEC_K; i++) {
            v[i] = _mm512_set1_ps(-__builtin_inff());
            id[i] = _mm512_set1_epi32(-1);
        }
        for (int64_t e = 0; e < E; e++) {
            __m512 x = _mm512_loadu_ps(blk + e * TOPK_LANES);
            __m512i xi = _mm512_set1_epi32((int)e);
            __mmask16 m = 0;     /* lanes where x has found its slot: the rest shift down */
            for (int i = 0; i < TOPK_VEC_K; i++) {
                m |= _mm512_cmp_ps_mask(x, v[i], _CMP_GT_OQ);
                const __m512 vi = v[i];
                const __m512i ii = id[i];
                v[i] = _mm512_mask_blend_ps(m, vi, x);
                id[i] = _mm512_mask_blend_epi32(m, ii, xi);
                x = _mm512_mask_blend_ps(m, x, vi);
                xi = _mm512_mask_blend_epi32(m, xi, ii);
            }
        }
        int32_t out[TOPK_VEC_K][TOPK_LANES];
        for (int i = 0; i < TOPK_VEC_K; i++) _mm512_storeu_si512((void *)out[i], id[i]);
        for (int64_t l = 0; l < nl; l++)
            for (int64_t i = 0; i < k; i++) ids[(t0 + l) * k + i] = out[i][l];
    }
}
#endif

void tm_topk(const float *scores, int64_t T, int64_t E, int64_t k, int64_t *ids) {
#ifdef __AVX512F__
    if (k <= TOPK_VEC_K && E <= TOPK_VEC_E && E >= TOPK_VEC_K) {
        topk_avx512(scores, T, E, k, ids);
        return;
    }
#endif
    for (int64_t t = 0; t < T; t++) topk_row(scores + t * E, E, k, ids + t * k);
}

/* ---- row movement on the sending side of the expert-parallel pipeline (dispatch/overlap.py) */

/* dst[r] = src[idx[r]] */
void tm_gather(float *dst, const float *src, const int64_t *idx, int64_t n, int64_t D) {
    gather_rows(dst, src, idx, n, D);
}

/* dst[idx[r]] += w[r] * src[r] (w may be NULL: weight 1); the multiply rides on the add */
void tm_scatter_add(float *dst, const float *src, const int64_t *idx, const float *w, int64_t n,
                    int64_t D) {
    if (w == 0) {
        scatter_add_rows(dst, src, idx, n, D);
        return;
    }
    for (int64_t r = 0; r < n; r++) {
        if (r + PREFETCH_AHEAD < n) prefetch_row(dst + idx[r + PREFETCH_AHEAD] * D, D, 1);
        float *restrict d = dst + idx[r] * D;
        const float *restrict s = src + r * D;
        const float wr = w[r];
        for (int64_t j = 0; j < D; j++) d[j] += wr * s[j];
    }
}

/* g = src[idx[r]]: dst[r] = w[r] * g and dot[r] = <g, other[r]>, one read of each row (the
 * combine's backward: the weighted output gradient to send, and the combine weight's gradient) */
void tm_gather_scale_dot(float *dst, const float *src, const int64_t *idx, const float *w,
                         const float *other, float *dot, int64_t n, int64_t D) {
    for (int64_t r = 0; r < n; r++) {
        if (r + PREFETCH_AHEAD < n) prefetch_row(src + idx[r + PREFETCH_AHEAD] * D, D, 0);
        const float *restrict g = src + idx[r] * D;
        const float *restrict o = other + r * D;
        float *restrict d = dst + r * D;
        const float wr = w[r];
        float acc = 0.0f;
        for (int64_t j = 0; j < D; j++) {
            d[j] = wr * g[j];
            acc += g[j] * o[j];
        }
        dot[r] = acc;
    }
}
