/* tinyengine's fused CPU decode kernels (float32), loaded by tinyengine/fused.py (which says why
   and how they are built); each computes what the torch code it names does, which stays the
   reference (tests/test_fused.py):
     decode_attention  a decode step's attention over a layer's cache slots: reference_attention
                       (tinyengine/attention.py), nc_attention (policies/correction.py) and
                       MomentKV's per-slot decode score (policies/momentkv.py, mi_cost_decode), in
                       one pass over the keys and values instead of a dozen torch ops per layer;
     momentum_scores, absorb_slots, choose_victim   the step-end work over every layer at once;
     momentum_step_end  the three, and the victims' freeing, in one pass (MomentKV).

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

   Layouts (contiguous unless said): q, out [B, Hkv, G, D]; k, v [B, Hkv, S, D]; pos: B * Hkv rows
   of S int64, row bh at pos + bh * pos_stride (a layer's view of the engine's [L, B, Hkv, S_max]);
   qpos [B] int64; n [B, Hkv]; mu_k, mu_v [B, Hkv, D]; C [B, Hkv, D, D]; probs: B * Hkv * G rows of
   S, row r at probs + r * probs_stride (the retained slots' probabilities, into a layer's view of
   the engine's [L, B, Hq, S_max] buffer; NULL: not wanted); score: B * Hkv rows of S, row bh at
   score + bh * score_stride (a layer's view of the engine's [L, B, Hkv, S_max] buffer; NULL: not wanted).
   k_new, v_new [B, Hkv, D], slot [B, Hkv] (NULL: none): the step's token, written into the cache
   first (KVCache.write). n == NULL: no moments (plain attention). parts: how many ranges each head's slots are split into
   (0: chosen here, slot_parts). */
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

/* Work: each (b, h) is split into `parts` ranges of its slots (flash-decoding), so that the
   B * Hkv heads keep every thread busy (SmolLM2's 3 kv heads on 2 threads would leave one idle a
   third of the time). Four loops over one thread team, each part on the same thread in each (the
   same static schedule), so a part's keys and values stay in that core's cache:
     1. per part: validity, logits, e^{l - top} against the part's own maximum `top`, their sum z
        and the unnormalized output sum_i e^{l_i - top} v_i;
     2. per head: the parts merged with the virtual slot (each rescaled by e^{top - max} / Z),
        the output, NC's first-order term;
     3. per part (probabilities or score wanted): the probabilities rescaled likewise, and for
        the score ||v_i - o_g||^2 and its partial sum over the part's valid slots;
     4. per part (score): the score. */

typedef struct {  /* one (b, h), over its S slots */
    float *valid, *p, *logit, *dist, *virt, *w, *cq, *count;
    int64_t ps;  /* p's row stride: S in the scratch, probs_stride in the caller's probs */
} Head;

typedef struct {  /* one part of a head's slots, [i0, i1): per query head its top, z, scale, the
                     partial distance sum (total), and the unnormalized output o [G, D] */
    int64_t i0, i1;
    float *top, *z, *scale, *total, *o, *count;
} Part;

/* Scratch sizes, rounded to 16 floats so that every head's and part's scratch starts on a 64-byte
   line: a part's output `o` is accumulated with vector stores, which must not straddle lines. */
static int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

static int64_t head_floats(int64_t G, int64_t S, int64_t D, const float *probs, const float *score) {
    return round16(S + (probs ? 0 : G * S) + (score ? 2 * G * S : 0) + 2 * G + D + 1);
}

static Head head_at(float *base, int64_t bh, int64_t G, int64_t S, float *probs, int64_t probs_stride, int score) {
    Head h;
    h.valid = base, base += S;
    if (probs) h.p = probs + bh * G * probs_stride, h.ps = probs_stride;
    else h.p = base, h.ps = S, base += G * S;
    h.logit = score ? base : NULL, base += score ? G * S : 0;
    h.dist = score ? base : NULL, base += score ? G * S : 0;
    h.virt = base, h.w = base + G, h.count = base + 2 * G, h.cq = base + 2 * G + 1;
    return h;
}

static Part part_at(float *base, int64_t c, int64_t parts, int64_t G, int64_t S) {
    Part t;  /* boundaries on multiples of 8 (rows_dot's blocks); a part may be empty */
    t.i0 = (S * c / parts) & ~(int64_t)7;
    t.i1 = c + 1 == parts ? S : (S * (c + 1) / parts) & ~(int64_t)7;
    t.top = base, t.z = base + G, t.scale = base + 2 * G, t.total = base + 3 * G, t.count = base + 4 * G;
    t.o = base + round16(4 * G + 1);  /* on its own line */
    return t;
}

/* How many parts per head: 1 when the heads already spread evenly (or the slots are few: each
   loop ends in a barrier), else the fewest that make B * Hkv * parts a multiple of the threads. */
static int64_t slot_parts(int64_t BH, int64_t S, int threads) {
    if (threads <= 1 || BH % threads == 0 || BH >= 4 * threads || S < 512) return 1;
    for (int64_t c = 2; c < threads; ++c)
        if (BH * c % threads == 0) return c;
    return threads;
}

/* 1. A part's logits, exponentials against its own maximum, their sum and its unnormalized output. */
static void attend_part(const Head *h, Part *t, int64_t G, int64_t S, int64_t D, float tau, const float *qh,
                        const float *kh, const float *vh, const int64_t *ph, int64_t now) {
    const int64_t i0 = t->i0, i1 = t->i1;
    float *valid = h->valid, count = 0.0f;
    for (int64_t i = i0; i < i1; ++i) count += (valid[i] = ph[i] >= 0 && ph[i] <= now);
    *t->count = count;
    for (int64_t b0 = i0; b0 < i1; b0 += 64) {  /* keys read once from memory, in blocks of 64 for all G */
        const int64_t m = i1 - b0 < 64 ? i1 - b0 : 64;
        for (int64_t g = 0; g < G; ++g) rows_dot(qh + g * D, kh + b0 * D, m, D, 0, h->p + g * h->ps + b0);
    }
    for (int64_t g = 0; g < G; ++g) {
        float *pg = h->p + g * h->ps, *lg = h->logit ? h->logit + g * S : pg, top = -INFINITY, z = 0.0f;  /* the score keeps the logits */
#pragma omp simd reduction(max : top)
        for (int64_t i = i0; i < i1; ++i) {
            const float l = valid[i] ? pg[i] * tau : -INFINITY;
            pg[i] = lg[i] = l;
            top = l > top ? l : top;
        }
        t->top[g] = top;
        const float m = top > -INFINITY ? top : 0.0f;  /* nothing visible in the part: its exponentials are 0 */
#pragma omp simd reduction(+ : z)
        for (int64_t i = i0; i < i1; ++i) {
            pg[i] = exp_nonpositive(pg[i] - m);
            z += pg[i];
        }
        t->z[g] = z;
    }
    memset(t->o, 0, sizeof(float) * G * D);
    for (int64_t i = i0; i < i1; ++i) {  /* output: one read of each value */
        const float *vi = vh + i * D;
        for (int64_t g = 0; g < G; ++g) {
            const float pgi = h->p[g * h->ps + i];
            float *og = t->o + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) og[d] += pgi * vi[d];
        }
    }
}

/* 2. A head's parts merged with the virtual slot: the softmax's normalizer, each part's scale, the
   output (+ NC's first-order term). */
static void merge_head(Head *h, float *part_base, int64_t part_size, int64_t parts, int64_t bh, int64_t G, int64_t S,
                       int64_t D, float tau, const float *qh, float nn, float log_n, const float *mu_k, const float *mu_v,
                       const float *C, float *oh) {
    float count = 0.0f;
    for (int64_t c = 0; c < parts; ++c) count += *part_at(part_base + c * part_size, c, parts, G, S).count;
    *h->count = count;
    for (int64_t g = 0; g < G; ++g) {
        const float virt = nn > 0 ? tau * dot(qh + g * D, mu_k + bh * D, D) + log_n : -INFINITY;
        float m = virt, z;
        for (int64_t c = 0; c < parts; ++c) {
            const float top = part_at(part_base + c * part_size, c, parts, G, S).top[g];
            m = top > m ? top : m;
        }
        m = m > -INFINITY ? m : 0.0f;
        z = exp_nonpositive(virt - m);
        for (int64_t c = 0; c < parts; ++c) {
            Part t = part_at(part_base + c * part_size, c, parts, G, S);
            t.scale[g] = exp_nonpositive(t.top[g] - m);  /* (0 for a part with nothing visible) */
            z += t.z[g] * t.scale[g];
        }
        const float inv_z = z > 0.0f ? 1.0f / z : 0.0f;
        float *og = oh + g * D;
        memset(og, 0, sizeof(float) * D);
        for (int64_t c = 0; c < parts; ++c) {
            Part t = part_at(part_base + c * part_size, c, parts, G, S);
            t.scale[g] *= inv_z;
            for (int64_t d = 0; d < D; ++d) og[d] += t.scale[g] * t.o[g * D + d];
        }
        h->virt[g] = virt;
        h->w[g] = exp_nonpositive(virt - m) * inv_z;
    }
    if (nn > 0) {  /* first-order term: w (mu_v + tau C q), C q as D row dot products */
        for (int64_t g = 0; g < G; ++g) {
            rows_dot(qh + g * D, C + bh * D * D, D, D, 0, h->cq);
            for (int64_t d = 0; d < D; ++d) oh[g * D + d] += h->w[g] * (mu_v[bh * D + d] + tau * h->cq[d]);
        }
    }
}

/* 3. A part's probabilities (its exponentials rescaled) and, for the score, ||v_i - o_g||^2 (a
   second read of the part's values, from this core's cache) and their sum over its valid slots. */
static void finish_part(const Head *h, Part *t, int64_t G, int64_t S, int64_t D, const float *vh, const float *oh) {
    const int64_t i0 = t->i0, i1 = t->i1;
    for (int64_t g = 0; g < G; ++g) {
        float *pg = h->p + g * h->ps;
        const float f = t->scale[g];
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) pg[i] *= f;
    }
    if (!h->dist) return;
    for (int64_t b0 = i0; b0 < i1; b0 += 64) {
        const int64_t m = i1 - b0 < 64 ? i1 - b0 : 64;
        for (int64_t g = 0; g < G; ++g) rows_dot(oh + g * D, vh + b0 * D, m, D, 1, h->dist + g * S + b0);
    }
    for (int64_t g = 0; g < G; ++g) {
        const float *dg = h->dist + g * S;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = i0; i < i1; ++i) total += dg[i] * h->valid[i];
        t->total[g] = total;
    }
}

/* 4. MomentKV's per-slot score over a part (module comment). */
static void score_part(const Head *h, const Part *t, float *part_base, int64_t part_size, int64_t parts, int64_t G,
                       int64_t S, float nn, float log_n, float mi_weight, float *sh) {
    const int64_t i0 = t->i0, i1 = t->i1;
    const float *valid = h->valid;
    for (int64_t i = i0; i < i1; ++i) sh[i] = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
        const float *pg = h->p + g * h->ps, *lg = h->logit + g * S, *dg = h->dist + g * S;
        float total = 0.0f;
        for (int64_t c = 0; c < parts; ++c) total += part_at(part_base + c * part_size, c, parts, G, S).total[g];
        float r = total / (*h->count > 0 ? *h->count : 1.0f);
        r = r > 1e-20f ? r : 1e-20f;
        /* MI's weight p_i - pbar (1 + x_i), x_i = l_i - lbar; 0 while nothing is evicted */
        const float pbar = nn > 0 ? h->w[g] / nn : 0.0f, lbar = nn > 0 ? h->virt[g] - log_n : 0.0f;
        const float on = nn > 0 ? mi_weight : 0.0f;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {
            float weight = pg[i] - pbar * (1.0f + (valid[i] ? lg[i] : 0.0f) - lbar);
            weight = weight > 0.0f ? weight : 0.0f;
            const float ratio = dg[i] / r;
            sh[i] += pg[i] + on * valid[i] * weight * sqrtf(ratio > 0.0f ? ratio : 0.0f);
        }
    }
    for (int64_t i = i0; i < i1; ++i) sh[i] /= (float)G;
}

int decode_attention(int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t D,
                     const float *q, float *k, float *v, int64_t *pos, int64_t pos_stride, const int64_t *qpos,
                     const float *k_new, const float *v_new, const int64_t *slot,
                     const float *n, const float *mu_k, const float *mu_v, const float *C,
                     float *out, float *probs, int64_t probs_stride, float *score, int64_t score_stride, float mi_weight, int64_t parts,
                     int threads) {
    const float tau = 1.0f / sqrtf((float)D);
    if (k_new) {  /* the step's token first: its key and value into slot[bh] of each (b, h), at position qpos[b] */
        for (int64_t bh = 0; bh < B * Hkv; ++bh) {
            memcpy(k + (bh * S + slot[bh]) * D, k_new + bh * D, sizeof(float) * D);
            memcpy(v + (bh * S + slot[bh]) * D, v_new + bh * D, sizeof(float) * D);
            pos[bh * pos_stride + slot[bh]] = qpos[bh / Hkv];
        }
    }
    const int64_t BH = B * Hkv, per_head = head_floats(G, S, D, probs, score), part_size = round16(4 * G + 1) + round16(G * D);
    parts = parts > 0 ? parts : slot_parts(BH, S, threads);
    float *scratch = aligned_alloc(64, sizeof(float) * (per_head + parts * part_size) * BH);
    if (!scratch) return 1;
    float *part_scratch = scratch + per_head * BH;
#define HEAD(bh) head_at(scratch + (bh) * per_head, (bh), G, S, probs, probs_stride, score != NULL)
#define PARTS(bh) (part_scratch + (bh) * parts * part_size)
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t x = 0; x < BH * parts; ++x) {
            const int64_t bh = x / parts, c = x % parts;
            Head h = HEAD(bh);
            Part t = part_at(PARTS(bh) + c * part_size, c, parts, G, S);
            attend_part(&h, &t, G, S, D, tau, q + bh * G * D, k + bh * S * D, v + bh * S * D, pos + bh * pos_stride, qpos[bh / Hkv]);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < BH; ++bh) {
            Head h = HEAD(bh);
            const float nn = n ? n[bh] : 0.0f, log_n = logf(nn);  /* -inf when nothing is evicted */
            merge_head(&h, PARTS(bh), part_size, parts, bh, G, S, D, tau, q + bh * G * D, nn, log_n, mu_k, mu_v, C,
                       out + bh * G * D);
        }
        if (probs || score) {
#pragma omp for schedule(static)
            for (int64_t x = 0; x < BH * parts; ++x) {
                const int64_t bh = x / parts, c = x % parts;
                Head h = HEAD(bh);
                Part t = part_at(PARTS(bh) + c * part_size, c, parts, G, S);
                finish_part(&h, &t, G, S, D, v + bh * S * D, out + bh * G * D);
            }
        }
        if (score) {
#pragma omp for schedule(static)
            for (int64_t x = 0; x < BH * parts; ++x) {
                const int64_t bh = x / parts, c = x % parts;
                Head h = HEAD(bh);
                Part t = part_at(PARTS(bh) + c * part_size, c, parts, G, S);
                const float nn = n ? n[bh] : 0.0f, log_n = logf(nn);
                score_part(&h, &t, PARTS(bh), part_size, parts, G, S, nn, log_n, mi_weight, score + bh * score_stride);
            }
        }
    }
#undef HEAD
#undef PARTS
    free(scratch);
    return 0;
}

/* The step-end work over every layer at once: each of rows = L * B * Hkv rows of S slots (row r
   of batch row b = (r / Hkv) % B) has a helper below, called by the entry points after them.

   momentum_row: MomentKV's score update (policies/momentum.py momentum_update and policies/base.py
   recent_mask), with `written` the slot the step's new token went to,
     s[written] = 0, then s = beta s + (1 - beta) a                     (Eq. 5 of moment-kv-momentum.txt)
     age[written] = 0, then age += 1, rank = s / (1 - beta^age)        (debias; age == NULL: rank = s)
     rank = PROTECT where pos > max(pos) - recent                       (recent < 0: no window)
   s and age are updated in place; rank is the score the victim choice reads (pos is read only
   with a window). */
static void momentum_row(int64_t S, float *sr, const float *ar, int64_t written, float *gr, const int64_t *pr,
                         int64_t recent, float beta, float log_beta, float protect, float *rr) {
    int64_t newest = -1;
    if (recent >= 0) {
#pragma omp simd reduction(max : newest)
        for (int64_t i = 0; i < S; ++i) newest = pr[i] > newest ? pr[i] : newest;
    }
    const int64_t from = recent >= 0 ? newest - recent : INT64_MAX;
    sr[written] = 0.0f;
    if (gr) gr[written] = 0.0f;
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
    if (recent >= 0) {
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) rr[i] = pr[i] > from ? protect : rr[i];
    }
}

/* victim_row (policies/base.py choose_victim): the pool is the valid slots holding a position
   >= from; once it holds more than `budget` entries, its lowest-scoring entry (among ties the
   oldest), else the first empty slot (0 if none). Written as min-reductions over the row, which
   vectorize (a loop carrying the running minimum and its slot does not): the pool's size, lowest
   score and first empty slot; then the oldest position holding that score; then its slot. */
static int64_t victim_row(int64_t S, const float *sr, const int64_t *pr, int64_t from, int64_t budget) {
    int64_t in_pool = 0, empty = S;
    float lowest = INFINITY;
    from = from > 0 ? from : 0;  /* the pool holds valid slots only */
#pragma omp simd reduction(+ : in_pool) reduction(min : lowest, empty)
    for (int64_t i = 0; i < S; ++i) {
        const int pool = pr[i] >= from;
        in_pool += pool;
        lowest = pool && sr[i] < lowest ? sr[i] : lowest;
        empty = pr[i] < 0 && i < empty ? i : empty;
    }
    if (in_pool <= budget) return empty < S ? empty : 0;
    int64_t oldest = INT64_MAX, slot = S;
#pragma omp simd reduction(min : oldest)
    for (int64_t i = 0; i < S; ++i) oldest = pr[i] >= from && sr[i] == lowest && pr[i] < oldest ? pr[i] : oldest;
#pragma omp simd reduction(min : slot)
    for (int64_t i = 0; i < S; ++i) slot = pr[i] == oldest && sr[i] == lowest && i < slot ? i : slot;
    return slot;
}

/* absorb_row (policies/correction.py, Correction.absorb_slots: Welford's update, exact): the entry
   k, v [D] joins the moments n, mu_k, mu_v [D], C [D, D] of the evicted set:
     n += 1, f = 1/n, d = entry - mean, C += f ((1 - f) d_v d_k^T - C), mean += f d. */
static void absorb_row(int64_t D, const float *k, const float *v, float *n, float *mk, float *mv, float *Cr) {
    *n += 1.0f;
    const float f_b = 1.0f / *n, f_a = 1.0f - f_b;
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

/* absorb_slot: absorb_row of the entry in slot `slot` of row lr = l * BH + r (layer l's keys and
   values [BH, caps[l], D], the moments [L * BH, ...]) if its position pos_row[slot] is valid (an
   empty slot adds nothing). */
static void absorb_slot(int64_t lr, int64_t BH, int64_t D, int64_t slot, const int64_t *pos_row, const int64_t *caps,
                        const float *const *keys, const float *const *values, float *n, float *mu_k, float *mu_v,
                        float *C) {
    if (pos_row[slot] < 0) return;
    const int64_t l = lr / BH, at = (lr % BH * caps[l] + slot) * D;
    absorb_row(D, keys[l] + at, values[l] + at, n + lr, mu_k + lr * D, mu_v + lr * D, C + lr * D * D);
}

/* momentum_row for every row: s, a, age (NULL: no debias), pos, rank [rows, S]; recent [B] (NULL:
   no window, and pos may be NULL). */
void momentum_scores(int64_t rows, int64_t B, int64_t Hkv, int64_t S, float *s, const float *a, const int64_t *written,
                     float *age, const int64_t *pos, const int64_t *recent, float beta, float protect, float *rank,
                     int threads) {
    const float log_beta = logf(beta);  /* -inf for beta = 0: beta^age = 0 for age >= 1 */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r)
        momentum_row(S, s + r * S, a + r * S, written[r], age ? age + r * S : NULL, pos ? pos + r * S : NULL,
                     recent ? recent[(r / Hkv) % B] : -1, beta, log_beta, protect, rank + r * S);
}

/* absorb_slot for each layer l and each of its BH = B * Hkv rows: slots [L, BH], pos [L, BH, S], the
   moments n [L, BH], mu_k, mu_v [L, BH, D] and C [L, BH, D, D]. */
void absorb_slots(int64_t L, int64_t BH, int64_t S, int64_t D, const int64_t *caps, const int64_t *slots,
                  const float *const *keys, const float *const *values, const int64_t *pos,
                  float *n, float *mu_k, float *mu_v, float *C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t lr = 0; lr < L * BH; ++lr)
        absorb_slot(lr, BH, D, slots[lr], pos + lr * S, caps, keys, values, n, mu_k, mu_v, C);
}

/* victim_row for every row, the pool starting at pool_from[b] with budget pool_budget[b]. */
void choose_victim(int64_t rows, int64_t B, int64_t Hkv, int64_t S, const float *scores, const int64_t *pos,
                   const int64_t *pool_from, const int64_t *pool_budget, int64_t *victim, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = (r / Hkv) % B;
        victim[r] = victim_row(S, scores + r * S, pos + r * S, pool_from[b], pool_budget[b]);
    }
}

/* MomentKV's whole step end, row by row: momentum_row, victim_row on its ranks, absorb_slot of the
   victim (n == NULL: no moments; an empty slot adds nothing), then the victim's slot freed
   (pos = -1) and written to slot [L, BH], which held the slots the step wrote (read first).
   The same as momentum_scores, choose_victim, absorb_slots and freeing in sequence (tested), with
   each row's ranks in a scratch row instead of an [L, BH, S] tensor and each row read once while
   it is in cache; one call instead of four from Python. */
int momentum_step_end(int64_t L, int64_t B, int64_t Hkv, int64_t S, int64_t D, float *s, const float *a,
                      float *age, int64_t *pos, const int64_t *recent, float beta, float protect,
                      const int64_t *pool_from, const int64_t *pool_budget, const int64_t *caps,
                      const float *const *keys, const float *const *values, float *n, float *mu_k, float *mu_v,
                      float *C, int64_t *slot, int threads) {
    const int64_t BH = B * Hkv;
    const float log_beta = logf(beta);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *rank = malloc(sizeof(float) * (size_t)S);
        if (!rank) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t lr = 0; lr < L * BH; ++lr) {
            if (!rank) continue;
            const int64_t b = lr % BH / Hkv;
            int64_t *pr = pos + lr * S;
            momentum_row(S, s + lr * S, a + lr * S, slot[lr], age ? age + lr * S : NULL, pr,
                         recent ? recent[b] : -1, beta, log_beta, protect, rank);
            const int64_t victim = victim_row(S, rank, pr, pool_from[b], pool_budget[b]);
            if (n) absorb_slot(lr, BH, D, victim, pr, caps, keys, values, n, mu_k, mu_v, C);
            pr[victim] = -1;
            slot[lr] = victim;
        }
        free(rank);
    }
    return failed;
}
