/* tinyengine's fused CPU decode kernels (float32), loaded by tinyengine/fused.py (which says why
   and how they are built); each computes what the torch code it names does, which stays the
   reference (tests/test_fused.py):
     decode_attention  a decode step's attention over a layer's cache slots: reference_attention
                       (tinyengine/attention.py), nc_attention (policies/correction.py) and
                       MomentKV's per-slot decode score (policies/momentkv.py, mi_cost_decode), in
                       one pass per kv head instead of a dozen torch ops per layer;
     momentum_scores, absorb_slots, choose_victim   the step-end work over every layer at once.

   decode_attention.

   Per (batch row b, kv head h), with G query heads q_g sharing its S slots and tau = 1/sqrt(D):
     l_gi   = tau q_g.k_i where slot i is valid (0 <= pos_i <= qpos_b), else -inf
     v_g    = tau q_g.mu_k + log n                  (NC's virtual slot; only with moments, n > 0)
     p_gi   = e^{l_gi} / Z_g,  w_g = e^{v_g} / Z_g,   Z_g = sum_i e^{l_gi} + e^{v_g}
     o_g    = sum_i p_gi v_i + w_g (mu_v + tau C q_g)
   and, when `score` is given (MomentKV's MI, module docstring 4 of policies/momentkv.py),
     d_gi   = ||v_i - o_g||^2 (directly, not expanded),  r_g = sum_valid d_gi / #valid
     c_gi   = max(0, p_gi - (w_g/n)(1 + l_gi - (v_g - log n))) sqrt(d_gi / r_g)   (0 if n = 0)
     score_i = mean_g p_gi + mi_weight mean_g c_gi                                 (0 on invalid slots)

   Layouts (contiguous): q, out [B, Hkv, G, D]; k, v [B, Hkv, S, D]; pos [B, Hkv, S] int64;
   qpos [B] int64; n [B, Hkv]; mu_k, mu_v [B, Hkv, D]; C [B, Hkv, D, D]; probs [B, Hkv, G, S]
   (the retained slots' probabilities; NULL: not wanted); score [B, Hkv, S] (NULL: not wanted).
   n == NULL: no moments (plain attention). Work is split over the B * Hkv heads. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static inline float dot(const float *a, const float *b, int64_t D) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
    return s;
}

static inline float dist2(const float *a, const float *b, int64_t D) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += (a[d] - b[d]) * (a[d] - b[d]);
    return s;
}

/* rows_dot: out[i] = x . rows[i] (or, with `distance`, ||rows[i] - x||^2) for the n rows of
   length D. Most of the kernel's time: a dot product per slot and query head. With AVX2 + FMA
   (and D a multiple of 8) eight rows at a time, their eight partial-sum vectors reduced by one
   transpose-and-add instead of eight horizontal sums. */
static void rows_dot(const float *x, const float *rows, int64_t n, int64_t D, int distance, float *out) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 8 == 0) {
        for (; i + 8 <= n; i += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 xd = _mm256_loadu_ps(x + d);
                for (int j = 0; j < 8; ++j) {
                    const __m256 r = _mm256_loadu_ps(rows + (i + j) * D + d);
                    if (distance) {
                        const __m256 diff = _mm256_sub_ps(r, xd);
                        acc[j] = _mm256_fmadd_ps(diff, diff, acc[j]);
                    } else {
                        acc[j] = _mm256_fmadd_ps(r, xd, acc[j]);
                    }
                }
            }
            const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
            const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
            const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
            _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                                    _mm256_permute2f128_ps(s0123, s4567, 0x31)));
        }
    }
#endif
    for (; i < n; ++i) out[i] = distance ? dist2(x, rows + i * D, D) : dot(x, rows + i * D, D);
}

/* e^x for x <= 0 (softmax's x - max), 0 below -87 and for -inf. Cephes' expf (Cody-Waite
   reduction, degree-6 polynomial, ~1 ulp), written so that the compiler vectorizes the loops
   that call it (libm's expf is a scalar call, most of this kernel's time if used). */
static inline float exp_nonpositive(float x) {
    const float xc = x > -87.0f ? x : -87.0f;
    const float n = rintf(xc * 1.44269504088896341f);
    const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x > -87.0f ? p * scale : 0.0f;
}

/* Scratch of one (b, h): per-query scalars, the slots' validity (and their count), the G x S
   probabilities unless `probs` holds them; for the score, the G x S logits and distances. */
typedef struct {
    float *top, *virt, *w, *cq, *valid, *p, *logit, *dist, count;
} Head;

static Head head_scratch(float *base, int64_t bh, int64_t G, int64_t S, int64_t D, float *probs, int score) {
    Head h;
    h.top = base, h.virt = base + G, h.w = base + 2 * G, h.cq = base + 3 * G, h.valid = base + 3 * G + D;
    h.p = probs ? probs + bh * G * S : h.valid + S;
    h.logit = score ? h.valid + S + (probs ? 0 : G * S) : NULL;
    h.dist = score ? h.logit + G * S : NULL;
    h.count = 0.0f;
    return h;
}

/* Attention of one (b, h): logits, softmax with the virtual slot, output (+ NC's first-order term). */
static void attend_head(Head *h, int64_t bh, int64_t G, int64_t S, int64_t D, float tau, const float *qh,
                        const float *kh, const float *vh, const int64_t *ph, int64_t now, float nn, float log_n,
                        const float *mu_k, const float *mu_v, const float *C, float *oh) {
    float *valid = h->valid, *p = h->p, *top = h->top, *virt = h->virt, *w = h->w;
    float count = 0.0f;
    for (int64_t i = 0; i < S; ++i) count += (valid[i] = ph[i] >= 0 && ph[i] <= now);
    h->count = count;
    for (int64_t g = 0; g < G; ++g) {
        virt[g] = nn > 0 ? tau * dot(qh + g * D, mu_k + bh * D, D) + log_n : -INFINITY;
        top[g] = virt[g];
    }
    for (int64_t i0 = 0; i0 < S; i0 += 64) {  /* logits: keys read once from memory, in blocks of 64 for all G */
        const int64_t m = S - i0 < 64 ? S - i0 : 64;
        for (int64_t g = 0; g < G; ++g) rows_dot(qh + g * D, kh + i0 * D, m, D, 0, p + g * S + i0);
    }
    for (int64_t g = 0; g < G; ++g) {
        float *pg = p + g * S, *lg = h->logit ? h->logit + g * S : pg, mx = top[g];  /* the score keeps the logits */
#pragma omp simd reduction(max : mx)
        for (int64_t i = 0; i < S; ++i) {
            const float l = valid[i] ? pg[i] * tau : -INFINITY;
            pg[i] = lg[i] = l;
            mx = l > mx ? l : mx;
        }
        top[g] = mx;
    }
    for (int64_t g = 0; g < G; ++g) {  /* softmax over the slots and the virtual slot together */
        float *pg = p + g * S, z = 0.0f;
        const float m = top[g];
#pragma omp simd reduction(+ : z)
        for (int64_t i = 0; i < S; ++i) {
            pg[i] = exp_nonpositive(pg[i] - m);
            z += pg[i];
        }
        const float e_virt = exp_nonpositive(virt[g] - m);
        z += e_virt;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) pg[i] /= z;
        w[g] = e_virt / z;
    }
    for (int64_t x = 0; x < G * D; ++x) oh[x] = 0.0f;
    for (int64_t i = 0; i < S; ++i) {  /* output: one read of each value */
        const float *vi = vh + i * D;
        for (int64_t g = 0; g < G; ++g) {
            const float pgi = p[g * S + i];
            float *og = oh + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) og[d] += pgi * vi[d];
        }
    }
    if (nn > 0) {  /* first-order term: w (mu_v + tau C q), C q as D row dot products */
        for (int64_t g = 0; g < G; ++g) {
            rows_dot(qh + g * D, C + bh * D * D, D, D, 0, h->cq);
            for (int64_t d = 0; d < D; ++d) oh[g * D + d] += w[g] * (mu_v[bh * D + d] + tau * h->cq[d]);
        }
    }
}

/* MomentKV's per-slot score of one (b, h), from its attention (module comment). */
static void score_head(const Head *h, int64_t G, int64_t S, int64_t D, const float *vh, const float *oh,
                       float nn, float log_n, float mi_weight, float *sh) {
    const float *valid = h->valid;
    float *dist = h->dist;
    for (int64_t i0 = 0; i0 < S; i0 += 64) {  /* ||v_i - o_g||^2: a second read of the values, from cache */
        const int64_t m = S - i0 < 64 ? S - i0 : 64;
        for (int64_t g = 0; g < G; ++g) rows_dot(oh + g * D, vh + i0 * D, m, D, 1, dist + g * S + i0);
    }
    for (int64_t i = 0; i < S; ++i) sh[i] = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
        const float *pg = h->p + g * S, *lg = h->logit + g * S, *dg = dist + g * S;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < S; ++i) total += dg[i] * valid[i];
        float r = total / (h->count > 0 ? h->count : 1.0f);
        r = r > 1e-20f ? r : 1e-20f;
        /* MI's weight p_i - pbar (1 + x_i), x_i = l_i - lbar; 0 while nothing is evicted */
        const float pbar = nn > 0 ? h->w[g] / nn : 0.0f, lbar = nn > 0 ? h->virt[g] - log_n : 0.0f;
        const float on = nn > 0 ? mi_weight : 0.0f;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) {
            float weight = pg[i] - pbar * (1.0f + (valid[i] ? lg[i] : 0.0f) - lbar);
            weight = weight > 0.0f ? weight : 0.0f;
            const float ratio = dg[i] / r;
            sh[i] += pg[i] + on * valid[i] * weight * sqrtf(ratio > 0.0f ? ratio : 0.0f);
        }
    }
    for (int64_t i = 0; i < S; ++i) sh[i] /= (float)G;
}

int decode_attention(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D,
                     const float *q, const float *k, const float *v, const int64_t *pos, const int64_t *qpos,
                     const float *n, const float *mu_k, const float *mu_v, const float *C,
                     float *out, float *probs, float *score, float mi_weight, int threads) {
    const float tau = 1.0f / sqrtf((float)D);
    const int64_t BH = B * Hkv, per_head = 3 * G + D + S + (probs ? 0 : G * S) + (score ? 2 * G * S : 0);
    float *scratch = malloc(sizeof(float) * per_head * BH);
    if (!scratch) return 1;
    /* One (b, h) per iteration, attention then score: the score's second read of the values finds
       them in this core's cache. (Handing the scores to whichever thread is free, with 3 kv heads on
       2 threads, measured no faster: the values are then in the other core's cache.) */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < BH; ++bh) {
        Head h = head_scratch(scratch + bh * per_head, bh, G, S, D, probs, score != NULL);
        const float nn = n ? n[bh] : 0.0f, log_n = logf(nn);  /* -inf when nothing is evicted */
        attend_head(&h, bh, G, S, D, tau, q + bh * G * D, k + bh * S * D, v + bh * S * D, pos + bh * S,
                    qpos[bh / Hkv], nn, log_n, mu_k, mu_v, C, out + bh * G * D);
        if (score) score_head(&h, G, S, D, v + bh * S * D, out + bh * G * D, nn, log_n, mi_weight, score + bh * S);
    }
    free(scratch);
    return 0;
}

/* MomentKV's step-end score update, every layer at once (policies/momentum.py momentum_update,
   and policies/base.py recent_mask): for each of the `rows` = L * B * Hkv rows of S slots, with
   `written` the slot the step's new token went to,
     s[written] = 0, then s = beta s + (1 - beta) a                     (Eq. 5 of moment-kv-momentum.txt)
     age[written] = 0, then age += 1, rank = s / (1 - beta^age)        (debias; age == NULL: rank = s)
     rank = PROTECT where pos > max(pos) - recent[b]                   (recent == NULL: no window)
   s and age are updated in place; rank [rows, S] is the score the victim choice reads. B and Hkv
   give each row its batch row b (for `recent`). */
void momentum_scores(int64_t rows, int64_t B, int64_t Hkv, int64_t S, float *s, const float *a, const int64_t *written,
                     float *age, const int64_t *pos, const int64_t *recent, float beta, float protect, float *rank,
                     int threads) {
    const float log_beta = logf(beta);  /* -inf for beta = 0: beta^age = 0 for age >= 1 */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        float *sr = s + r * S, *rr = rank + r * S, *gr = age ? age + r * S : NULL;
        const float *ar = a + r * S;
        const int64_t *pr = pos ? pos + r * S : NULL;
        int64_t newest = -1;
        if (recent) {
#pragma omp simd reduction(max : newest)
            for (int64_t i = 0; i < S; ++i) newest = pr[i] > newest ? pr[i] : newest;
        }
        const int64_t from = recent ? newest - recent[(r / Hkv) % B] : INT64_MAX;
        sr[written[r]] = 0.0f;
        if (gr) gr[written[r]] = 0.0f;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) {
            const float si = sr[i] * beta + ar[i] * (1.0f - beta);
            sr[i] = si;
            float ri = si;
            if (gr) {
                gr[i] += 1.0f;
                ri = si / (1.0f - exp_nonpositive(gr[i] * log_beta));
            }
            rr[i] = ri;
        }
        if (recent) {
#pragma omp simd
            for (int64_t i = 0; i < S; ++i) rr[i] = pr[i] > from ? protect : rr[i];
        }
    }
}

/* A decode step's evicted entries join the moments of the evicted set, every layer at once
   (policies/correction.py, Correction.absorb_slots: Welford's update, exact): for each layer l and
   each of its BH = B * Hkv rows r, the entry in slot slots[l, r] of layer l's keys/values
   [BH, caps[l], D], if its position (pos [L, BH, S]) is valid (>= 0; an empty slot adds nothing),
   updates n, mu_k, mu_v [L, BH, D] and C [L, BH, D, D]:
     n += 1, f = 1/n, d = entry - mean, C += f ((1 - f) d_v d_k^T - C), mean += f d. */
void absorb_slots(int64_t L, int64_t BH, int64_t S, int64_t D, const int64_t *caps, const int64_t *slots,
                  const float *const *keys, const float *const *values, const int64_t *pos,
                  float *n, float *mu_k, float *mu_v, float *C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t lr = 0; lr < L * BH; ++lr) {
        const int64_t l = lr / BH, r = lr % BH, slot = slots[lr];
        if (pos[lr * S + slot] < 0) continue;
        const float *k = keys[l] + (r * caps[l] + slot) * D, *v = values[l] + (r * caps[l] + slot) * D;
        float *mk = mu_k + lr * D, *mv = mu_v + lr * D, *Cr = C + lr * D * D;
        n[lr] += 1.0f;
        const float f_b = 1.0f / n[lr], f_a = 1.0f - f_b;
        for (int64_t d = 0; d < D; ++d) {
            const float dv = (v[d] - mv[d]) * f_a;
            float *row = Cr + d * D;
#pragma omp simd
            for (int64_t e = 0; e < D; ++e) row[e] += f_b * (dv * (k[e] - mk[e]) - row[e]);
        }
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
            mk[d] += f_b * (k[d] - mk[d]);
            mv[d] += f_b * (v[d] - mv[d]);
        }
    }
}

/* The slot to free per row, every layer at once (policies/base.py choose_victim): for each of the
   rows = L * B * Hkv rows of S slots, the pool is the valid slots holding a position >= pool_from[b];
   once it holds more than pool_budget[b] entries, its lowest-scoring entry (among ties the oldest),
   else the first empty slot (0 if none). */
void choose_victim(int64_t rows, int64_t B, int64_t Hkv, int64_t S, const float *scores, const int64_t *pos,
                   const int64_t *pool_from, const int64_t *pool_budget, int64_t *victim, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = (r / Hkv) % B, from = pool_from[b];
        const float *sr = scores + r * S;
        const int64_t *pr = pos + r * S;
        int64_t in_pool = 0, lowest = 0, empty = -1, lowest_pos = INT64_MAX;
        float lowest_score = INFINITY;
        for (int64_t i = 0; i < S; ++i) {
            const int64_t p = pr[i];
            if (p < 0) {
                if (empty < 0) empty = i;
                continue;
            }
            if (p < from) continue;
            ++in_pool;
            if (sr[i] < lowest_score || (sr[i] == lowest_score && p < lowest_pos)) {
                lowest_score = sr[i];
                lowest_pos = p;
                lowest = i;
            }
        }
        victim[r] = in_pool > pool_budget[b] ? lowest : (empty < 0 ? 0 : empty);
    }
}
