"""MomentKV (momentkv-moment-statistics.txt): moment-informed eviction (MI) + normalization-corrected
attention (NC), made exact.

The paper states the method in words; here is the exact version this file and
policies/correction.py implement.

1. Moments. Per layer and kv head, the evicted set E is summarized by n, mu_k, mu_v and
   C = (1/n) sum_E (v_i - mu_v)(k_i - mu_k)^T, updated exactly at every eviction (Welford /
   Chan merges, policies/correction.py). Cost: head_dim^2 + 2 head_dim + 1 floats per kv head
   per layer (`moment_floats`), 33 tokens' worth at head_dim 64 in float32.

2. NC. With tau = 1/sqrt(head_dim), first order in x_i = tau q.(k_i - mu_k):
       Z_E = sum_E e^{tau q.k_i} ~ n e^{tau q.mu_k},   N_E = sum_E e^{tau q.k_i} v_i ~ Z_E (mu_v + tau C q)
   so o = (Z_K o_K + Z_E (mu_v + tau C q)) / (Z_K + Z_E) (derivation in correction.py).

3. The NC error is a sum of per-token terms. Write lbar = tau q.mu_k, p_i = e^{tau q.k_i}/Z and
   pbar = e^{lbar}/Z for the true normalizer Z = Z_K + Z_E. Because e^{x} = 1 + x + phi(x) with
   phi(x) = e^x - 1 - x >= 0, and sum_E x_i = 0, the evicted set's exact contributions are
       Z_E = n e^{lbar} + e^{lbar} sum_E phi(x_i),   N_E = n e^{lbar}(mu_v + tau C q) + e^{lbar} sum_E phi(x_i) v_i
   and therefore, exactly,
       o_true - o_NC = sum_{i in E} pbar phi(x_i) (v_i - o_NC).
   Evicting a token i into the summary adds the term pbar phi(x_i) (v_i - o_NC) to the error,
   where plain eviction would add p_i (v_i - o_K). A token whose key is near the summary's mean
   (x_i ~ 0, phi ~ x^2/2) is captured almost for free; one far from it is not (phi grows like
   e^x above the mean and like |x| below it, where the linearization even predicts a negative
   weight 1 + x_i).

4. MI score (`mi="nc"`, default). For observation queries q (the prefill window's last
   `window` queries; at decode the current query), the cost of evicting candidate i is
       c_i(q) = pbar(q) phi(x_i(q)) ||v_i - o_NC(q)|| / rms_j ||v_j - o_NC(q)||,
   its triangle-inequality share of ||o_true - o_NC||, with the distance made relative (the
   RMS over the candidates of that query) so c is in the units of attention probability, like
   the base score. The summary it is measured against is the one the eviction will produce:
   at prefill the current moments merged with the base scorer's drop set (the tokens it would
   evict; one fixed-point step), at decode the current moments. Z is estimated as
   Z_K + n e^{tau q.mu_k} with the current moments. c = 0 while the summary is empty.
   The keep score is
       score_i = base_i + mi_weight * mean_q c_i(q)
   so among tokens of similar base score, those the summary already captures go first.
   Alternatives (`mi=`): "value", the attention-weighted relative distance of v_i to the
   summary's prediction, p_i ||v_i - (mu_v + tau C q)|| / rms; "none", the base score alone.

5. Base scorers (the paper leaves the base score open). Prefill: the observation window's
   mean attention (the last `window` prompt queries, default 512: with prompts up to 512
   tokens every query votes, i.e. H2O's accumulated attention over the prompt, normalized per
   query), pooled over `kernel` neighbours (default 1: none), averaged over each kv head's
   query group. The mean (`vote_mean`): "window" (default) divides a token's summed votes by the
   window's queries, so a token inside the window, seen by fewer of them, scores lower for it;
   "token" divides by the queries that see the token, its mean attention received, kvpress's
   ObservedAttention (with the window covering the prompt, recent=0, mi="none" and nc=False the
   prompt set is ObservedAttention's: tests/test_kvpress_equality.py). NC on that base (the same
   with nc on, bench.py OBSERVED_NC) lowers ObservedAttention's KL to full on prose at every ratio
   on three seeds (BENCHMARKS.md, fidelity and its other seeds; ratios 0.5 / 0.75 / 0.875):
   0.0084 / 0.026 / 0.091 -> 0.0071 / 0.024 / 0.079, 0.029 / 0.060 / 0.116 -> 0.028 / 0.059 / 0.114,
   0.0060 / 0.018 / 0.042 -> 0.0055 / 0.017 / 0.037. With MI as well it lost at 2 of 6 on seeds 1, 2
   (ad hoc runs, not checked in).
   Protected: with `recent` = r >= 0 (default 0.25) the newest floor(r * budget) tokens, at
   prefill and at every decode step (H2O's recent window); with recent < 0, SnapKV's rule (the
   window's own tokens at prefill, nothing at decode), and then window=64, kernel=7 and
   mi="none" keep exactly SnapKV's set (policies/snapkv.py). MI is added to the unprotected
   scores, averaged as the votes are. Decode (momentum-style, Eq. 5 of moment-kv-momentum.txt):
   s_i <- beta s_i + (1 - beta)(a_i + mi_weight c_i), new tokens entering at 0, with a_i the
   attention of the kv head's query group (`per_kv_head`, default; False: all heads of the
   layer, as Moment-KV, section 5c). The prompt tokens kept by prefill
   start decode with their prefill score, a per-query attention mean, in the same units (the
   protected tokens with the best kept score of their row and head, `carry="best"`, or with
   their own votes, `carry="own"`). Because those are
   already means while a new token's EMA starts at 0, the ranking uses Adam's bias correction
   s / (1 - beta^age) (`debias`, default on; age = steps since the token entered, prompt
   tokens stationary). Without it a new token scores (1 - beta) a on its first step, ~1/33 of
   a prompt token with the same attention, and is evicted at once: on SmolLM2 (512-token
   prompt, 48 teacher-forced steps, budget 128) KL to full 0.40 without, 0.18 with.

5b. Query-agnostic base (`base="keys"`). The attention base scores what the observation queries
   attend to; when the question comes after the compression (RULER's query-agnostic setting,
   bench.py), those queries are the context's own, and a needle they do not read is dropped.
   base="keys" needs no query: a token's keep score is 1 - cos(k_i, mu_k), the distance of its
   key's direction from the key mean of the summary (`key_distinctness`), so tokens whose keys the
   summary already points along go first, the paper's "tokens already well captured by the
   accumulated summary", measured by the summary's key direction alone. At prefill the summary
   is the one the eviction produces (as for MI: KeyDiff's choice, anchored on the mean unit key,
   gives the drop set, merged into the current moments; one fixed-point step); with mi="none"
   the anchor stays KeyDiff's and the prompt set is KeyDiff's (tested). At decode the observation
   is the same score against the current moments, through the same momentum and recent window
   (with a constant observation the debiased EMA is that score). The MI cost and the fused score
   kernel are not used (the step runs in torch, policies/momentkv.py observe). NC is unchanged.

5c. Heads (`per_kv_head`). True (default): each kv head ranks its own tokens by its query group's
   attention, at prefill and decode, so kv heads keep different tokens. False: one decision per
   layer, as TOVA and Moment-KV make it: every score (base, MI cost, key distinctness) is averaged
   over the layer's heads, so every kv head keeps the same tokens in the same slots (ties break the
   same way), and the decode mean over all query heads, taken slot by slot, reads one token per
   slot (tested). A token read by any head group stays for all of them. Measured (BENCHMARKS.md, SmolLM2,
   unified at total capacity): with beta=0.9, long generation's KL to full along 2048 tokens is
   6.5e-5 / 4.8e-5 / 2.6e-5 at decode budgets 128 / 256 / 512 against the default's ~2e-3 (most of it
   from the positions ~1400 tokens in, where h2o, also per kv head, spikes too) and TOVA's 3.6e-4 / 2.6e-4 /
   1.5e-4 (beta=0.9 with it was chosen on another seed, bench.py LAYER_DECISION); on prose (fidelity) it costs KL 0.016 / 0.054 / 0.117 against
   0.011 / 0.034 / 0.085 at ratios 0.5 / 0.75 / 0.875. Which change gains (ad hoc, not
   checked in: `bench.py quality --suites longgen --decode-policies "momentkv,momentkv{beta=0.9},
   momentkv{per_kv_head=0;beta=0.9},h2o" --decode-budgets 128 --gen-tokens 1600 --no-kvpress`, seed 0): KL to
   full 2.6e-3 / 5.1e-4 / 2.8e-5 (h2o 2.5e-3). beta=0.9 per kv head shortens the spike (last 100 tokens
   4e-2 -> 3e-3) but elsewhere stays at the default's 2e-4 - 6e-4 per 100 tokens, ~20x the layer
   decision's: the decision per layer is most of the gain. So the default stays per kv head.

6. Pools. `momentkv` alone is unified: prefill compresses the prompt to --budget and decode
   keeps the whole cache within the same --budget, evicting prompt or generated tokens alike.
   Composed, `snapkv+momentkv` freezes snapkv's prompt and manages the generated tokens within
   --decode-budget; `momentkv+momentum` compresses the prompt with MI and decodes with Moment-KV.

7. Measured (SmolLM2-135M; bench.py's quick fidelity task: 2 passages of Python's
   pydoc_data.topics, 512-token context compressed at prefill to --ratio, 32 reference tokens
   teacher-forced through decode steps, unified budget, mean KL(full || policy); reproduced
   with benchkit.drive/compare). Old defaults = SnapKV base (window 64, kernel 7, its window
   protected, recent=-1); new defaults = window 512, kernel 1, recent 0.25:
                               ratio 0.5   0.75    0.875
       seed 0  h2o              0.0109   0.0417
               snapkv           0.0203   0.0892
               momentkv old     0.0290   0.2102
               momentkv new     0.0088   0.0336
       seed 1  h2o              0.0203   0.0730  0.1994
               snapkv           0.0095   0.0672  0.1620
               momentkv old     0.0075   0.0963  1.0960
               momentkv new     0.0172   0.0690  0.1559
   Why the old defaults lost: the 64 protected window tokens carried the best score of their
   row into decode, so at budget 128 they held half the cache for good and evicted prompt
   heavy hitters and generated tokens instead (seed 0, 0.75: the same prefill with the
   generated tokens kept, `momentkv+momentum`, 0.076; unified 0.210; carry="own" 0.100).
   Seed 0, 0.75, new base: recent 0.125/0.25/0.5 -> 0.041/0.034/0.031 (at 0.5: 0.0124/0.0088/0.0091),
   kernel 7/3/1 -> 0.045/0.040/0.034, mi="none" 0.0344 (MI's gain is small here),
   mi_weight 2 0.0333, beta 0.99 0.050. Not tuned on seed 1, where snapkv stays ahead at 0.5.
   1024-token context (seed 0, default window 512): ratio 0.75 momentkv 0.058, h2o 0.091;
   0.875 momentkv 0.219, h2o 0.180 (behind H2O there; window 1024 not measured).

8. Decode step. An eager decode step on a CPU pays per op more than per byte, so the work is
   split by what it needs. At each layer (`observe`), only what reads that layer's cache: NC's
   virtual slot (correction.nc_attention: a few ops on top of plain attention) and, for MI,
   the products o.v_i of ||v_i - o||^2 (`value_products`: one matmul over the values), kept with
   the step's scores and probabilities. After the last layer (`score_step`, the engine's
   `scores_at_step_end`), the rest of ||v_i - o||^2 (`value_distances`, with ||v_i||^2 kept as
   tokens are written), MI's cost, the momentum update and the recent window run once over
   every layer's, stacked: the same ops, counted once instead of once per layer.
   `decode_scores` is the two for one layer (equal bit for bit, tested). What is kept is about
   3 G (S + 1) floats per kv head per layer (G query heads per kv head: scores, probabilities,
   products) plus the layer's output and new value, working memory of the step. Cost against
   full: BENCHMARKS.md, decode speed against context length.
   On a CPU in float32 all of it runs fused (tinyengine/decode_kernel.c, the engine's default
   decode backend there): the attention kernel writes, per layer, the per-slot
   a_i + mi_weight c_i averaged over the kv head's query group (`fused_score`; ||v_i - o||^2
   computed directly, not expanded) into the engine's [L, B, Hkv, S] step buffer (nothing is
   kept or stacked), and `score_step` updates the momentum, the ages and the
   recent window for every layer in one C pass (fused.momentum_scores). This code is its
   reference (tests/test_fused.py), and the path on CUDA, for other dtypes, or per_kv_head=False.
   A compiled step on a CPU calls the same kernels as operators (tinyengine/fused.py).

Ablation (the paper's: NC is worth more than MI, and the two are super-additive), all with the
same base scorer: options {"mi": "none", "nc": False} evict-only, {"mi": "none"} NC alone,
{"nc": False} MI alone, {} MI + NC (see ABLATION). `--correction nc` attaches NC to any other
evicting policy.
"""
from __future__ import annotations

import math

import torch

import torch.nn.functional as F

from policies.base import PROTECT, Policy, keep_top, recent_mask, stack_layers
from policies.correction import Moments, batch_moments, merge
from policies.momentum import STATIONARY, momentum_update, received_attention
from policies.snapkv import snapkv_scores
from tinyengine import fused
from tinyengine.attention import query_block, slot_mask
from tinyengine.dist import head_mean

MI_KINDS = ("nc", "value", "none")
ABLATION = {  # name -> make_plan options for policy "momentkv"
    "evict-only": {"mi": "none", "nc": False},
    "NC": {"mi": "none"},
    "MI": {"nc": False},
    "MI+NC": {},
}


def mi_cost(q, allowed, keys, values, current: Moments, reference: Moments, kind: str = "nc", out=None) -> torch.Tensor:
    """Per-candidate eviction cost c_i(q) (module docstring, 4): [B, Hq, T, N].

    q [B, Hq, T, D]; allowed [B, Hkv, T, N] (which candidates each query sees); keys, values
    [B, Hkv, N, D]; `current`: moments of what is already evicted (for the normalizer and the
    corrected output); `reference`: the summary the eviction produces (its mean, or for
    "value" its prediction). Zero where a query does not see a candidate or the summary is empty.
    out [B, Hq, T, D]: the NC-corrected attention output if the caller has it (else computed).

    Prefill scores every window query against every candidate, so this runs on [B, Hq, T, N]
    blocks and its cost is the number of passes over them (~20, in place where it can): the
    weight pbar phi(x_i) is p_i - pbar (1 + x_i) (exact; near x = 0 it cancels to a few float32
    ulps of p_i, far below any score difference: tests/test_momentkv.py holds it to the float64
    definition), and ||v_i - o||^2 is expanded into one matmul over the values.
    """
    B, Hq, T, D = q.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    tau = 1.0 / math.sqrt(D)
    qg = q.float().reshape(B, Hkv, Hq // Hkv * T, D) * tau  # scaled once: logits = qg @ k^T
    k, v = keys.float(), values.float()
    blocked = ~allowed.unsqueeze(2)  # [B, Hkv, 1, T, N]: broadcast over each kv head's query group
    logits = qg @ k.transpose(-1, -2)
    logits.view(B, Hkv, -1, T, N).masked_fill_(blocked, float("-inf"))
    top = logits.amax(-1, keepdim=True).clamp(min=-1e30)  # a query that sees nothing: no NaN
    p = (logits - top).exp_()
    lse_k = p.sum(-1, keepdim=True).log_().add_(top).clamp_(min=-1e30)
    # The current summary's virtual slot: normalizer estimate and corrected output (NC).
    n_c, mk_c, mv_c, C_c = current
    virtual = qg @ mk_c.unsqueeze(-1) + n_c.log()[..., None, None]
    lse = torch.logaddexp(lse_k, virtual)
    p.mul_((top - lse).exp())  # p_i = e^{l_i} / Z, Z = Z_K + Z_E (the summary's estimate)
    if out is None:  # (1 - w_E) softmax_K @ v = p @ v
        out = p @ v + (virtual - lse).exp() * (mv_c.unsqueeze(-2) + qg @ C_c.transpose(-1, -2))
    else:
        out = out.float().reshape(qg.shape)
    n_r, mk_r, mv_r, C_r = reference
    if kind == "nc":
        lbar = qg @ mk_r.unsqueeze(-1)
        pbar = (lbar - lse).exp()
        # pbar (1 + x_i) = pbar l_i + pbar (1 - lbar); +inf where blocked, zeroed below
        weight = torch.addcmul(p, pbar, logits, value=-1).sub_(pbar * (1 - lbar)).clamp_(min=0)
        target = out
    elif kind == "value":
        weight = p
        target = mv_r.unsqueeze(-2) + qg @ C_r.transpose(-1, -2)  # (qg carries tau)
    else:
        raise ValueError(f"unknown mi {kind!r}; choose from {', '.join(MI_KINDS)}")
    norms = (target * target).sum(-1, keepdim=True) + (v * v).sum(-1).unsqueeze(-2)
    d2 = torch.baddbmm(norms.reshape(B * Hkv, -1, N), target.reshape(B * Hkv, -1, D), v.reshape(B * Hkv, N, D).transpose(-1, -2),
                       alpha=-2).view(B, Hkv, -1, T, N).clamp_(min=0).masked_fill_(blocked, 0.0)
    seen = allowed.sum(-1, keepdim=True).unsqueeze(2).clamp(min=1)  # [B, Hkv, 1, T, 1]
    rms2 = (d2.sum(-1, keepdim=True) / seen).clamp_(min=1e-20)
    scale = (n_r > 0)[..., None, None, None] / rms2.sqrt_()
    cost = weight.view(d2.shape).mul_(d2.sqrt_()).mul_(scale).masked_fill_(blocked, 0.0)
    return cost.view(B, Hq, T, N)


def mi_cost_decode(probs, w, logits, virtual, d2, n, valid) -> torch.Tensor:
    """mi_cost for one decode query per head (kind "nc", measured against the current summary),
    from the numbers NC attention already has, for one layer or every layer at once: [..., G, S].

    Leading dims `...` are [B, Hkv] or [L, B, Hkv]; G query heads per kv head, S slots.
    probs [..., G, S]: the retained slots' probabilities under the corrected softmax; w [..., G]:
    the virtual slot's, w_E; logits [..., G, S]: the slots' scaled scores (-inf on empty slots);
    virtual [..., G]: the virtual slot's, tau q.mu_k + log n (correction.nc_attention);
    d2 [..., G, S]: ||v_i - o||^2 expanded as ||v_i||^2 - 2 o.v_i + ||o||^2 (one batched matmul
    over the values, `value_distances`); n [...]: the evicted count; valid [..., S]: pos >= 0.
    Same quantity as `mi_cost` (compared on random inputs in tests/test_momentkv.py), without
    its second pass over the keys or its softmax, in elementwise ops that batch over layers:
      - pbar = e^{lbar} / Z = w_E / n, since w_E = n e^{lbar} / Z;
      - x_i = l_i - lbar with lbar = virtual - log n;
      - pbar phi(x_i) = p_i - pbar (1 + x_i), since p_i = pbar e^{x_i} (as `mi_cost`; exact,
        and near x = 0 the two terms cancel to ~1e-7 pbar, far below any score difference);
      - the d2 expansion rounds to ~sqrt(D u) (|v_i| + |o|) in float32 where v_i ~ o (a token
        holding nearly all the attention, whose cost is then near zero anyway); both this and
        `mi_cost` are tested against the float64 definition to that floor.
    """
    n = n[..., None, None]
    pbar = w.unsqueeze(-1) / n
    lbar = virtual.unsqueeze(-1) - n.log()  # -inf - -inf = NaN where nothing is evicted: cleared below
    # pbar (1 + x_i) = pbar l_i + pbar (1 - lbar): the [..., G, 1] terms first, two passes over [..., G, S]
    weight = torch.addcmul(probs - pbar * (1 - lbar), pbar, logits, value=-1)  # inf/NaN on empty slots: cleared below
    # Every op here is a pass over [..., G, S] (all layers' at once): few, in place, no broadcast masks
    # until the last. The empty slots' d2 is finite (stale values), and the mean over the valid ones a dot product.
    seen = valid.unsqueeze(-2).float()  # [..., 1, S]
    rms2 = (torch.linalg.vecdot(d2, seen) / seen.sum(-1).clamp(min=1)).unsqueeze(-1)  # [..., G, 1]
    cost = weight.clamp_(min=0).mul_((d2 / rms2.clamp(min=1e-20)).clamp_(min=0).sqrt_())
    return cost.masked_fill_(~(valid.unsqueeze(-2) & (n > 0)), 0.0)


def value_products(out, values) -> torch.Tensor:
    """o.v_i for each decode query's output o and each slot, one batched matmul over the values (the
    one part of ||v_i - o||^2 that reads the cache): out [B, Hq, 1, D], values [B, Hkv, S, D] -> [B, Hkv, G, S]."""
    B, Hkv, S, D = values.shape
    o = out.float().reshape(B * Hkv, -1, D)
    return torch.bmm(o, values.float().reshape(B * Hkv, S, D).transpose(-1, -2)).view(B, Hkv, -1, S)


def value_distances(out, values, value_norm2=None, products=None) -> torch.Tensor:
    """||v_i - o||^2 = ||v_i||^2 - 2 o.v_i + ||o||^2 for each decode query's output o and each slot,
    over any leading dims: out [..., G, D] (or [B, Hq, 1, D]), values [..., S, D] -> [..., G, S].
    value_norm2 [..., S]: the ||v_i||^2 if the caller keeps them; products [..., G, S]: the o.v_i if
    the caller has them (`value_products`; then values is not read)."""
    if products is None:
        products = value_products(out, values)
    if value_norm2 is None:
        value_norm2 = torch.linalg.vecdot(values.float(), values.float())
    o = out.float().reshape(products.shape[:-1] + out.shape[-1:])
    norms = torch.linalg.vecdot(o, o).unsqueeze(-1) + value_norm2.unsqueeze(-2)
    return norms.add_(products, alpha=-2)  # = baddbmm(norms, o, v^T, alpha=-2), bit for bit


def mi_cost_sum(q, allowed, keys, values, current: Moments, reference: Moments, kind: str = "nc") -> torch.Tensor:
    """mi_cost summed over the queries, [B, Hq, N]: in query blocks, whose temporaries stay small
    (tinyengine.attention.query_block)."""
    step = query_block(q.shape[0] * q.shape[1], keys.shape[2])
    return sum(mi_cost(q[:, :, t:t + step], allowed[:, :, t:t + step], keys, values, current, reference, kind).sum(2)
               for t in range(0, q.shape[2], step))


def key_distinctness(keys, pos, anchor=None, have=None) -> torch.Tensor:
    """1 - cos(k_i, anchor) per slot (docstring, 5b): keys [..., N, D], pos [..., N] (-1: empty) -> [..., N].

    anchor [..., D]: the summary's key mean, used where `have` [...] is True (the summary holds
    tokens); elsewhere KeyDiff's anchor, the mean unit key of the valid entries (policies/keydiff.py:
    the same ranking as its -cos, shifted to [0, 2] so that scores are never negative, like attention)."""
    k = keys.float()
    valid = (pos >= 0).unsqueeze(-1)
    mean_unit = (F.normalize(k, dim=-1) * valid).sum(-2) / valid.sum(-2).clamp(min=1)
    if anchor is not None:
        mean_unit = torch.where(have.unsqueeze(-1), anchor.float(), mean_unit)
    return 1 - F.cosine_similarity(k, mean_unit.unsqueeze(-2), dim=-1)


def vote_scores(window_probs, pos, kernel: int, pooling: str, seen=None) -> torch.Tensor:
    """SnapKV's votes without its window protection: the window queries' mean attention, pooled
    along the sequence, averaged over each kv head's query group. [B, Hq, W, N] -> [B, Hkv, N].

    seen [B, Hkv, N]: per candidate, the number of window queries that see it (vote_mean="token":
    each token's mean over its own voters, ObservedAttention's); None: every candidate's sum is
    divided by the window's real queries (vote_mean="window")."""
    B, Hkv, N = pos.shape
    G = window_probs.shape[1] // Hkv
    probs = window_probs.float()
    if seen is None:
        seen = (probs.sum(-1) > 0).sum(-1, keepdim=True).clamp(min=1)  # the window's real queries (others are zero rows)
    else:
        seen = seen.repeat_interleave(G, dim=1)  # [B, Hq, N]: a kv head's count for each query head of its group
    votes = probs.sum(dim=2) / seen  # a mean over voters: attention-probability units at any window size
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    votes = pool(votes, kernel, stride=1, padding=kernel // 2)
    return votes.view(B, Hkv, G, N).mean(dim=2)


class MomentKV(Policy):
    name = "momentkv"
    description = "MomentKV: moments of the evicted set steer eviction (MI) and correct attention (NC)"
    has_prefill = True
    has_decode = True
    needs_probs = True
    needs_query = True  # the engine passes queries, the cache/candidates, the moments, NC attention's scores and the new value
    window = 512  # prefill observation window (queries): at least the prompt, so every prompt query votes (docstring, 5)
    kernel = 1  # pooling width over neighbouring slots (odd); 1: no pooling (SnapKV's is 7)
    pooling = "max"  # as snapkv: max or avg
    beta = 0.97  # decode momentum
    mi = "nc"  # moment-informed score: nc | value | none
    mi_weight = 1.0
    nc = True  # attach the NC correction (False: MI alone)
    per_kv_head = True  # scores per kv head (its GQA group); False: one decision per layer, all heads (docstring 5c)
    debias = True  # rank by s / (1 - beta^age): new tokens compete with the prompt's stationary scores
    recent = 0.25  # newest tokens protected, a fraction of the budget (H2O's recent window); < 0: SnapKV's window
    carry = "best"  # decode start score of protected prompt tokens: best (kept score of their row) | own (their votes)
    base = "attention"  # base score: attention (observed queries) | keys (query-agnostic key geometry, docstring 5b)
    vote_mean = "window"  # votes averaged over the window's queries | "token": over the queries that see each token (5)

    def needs_moments(self) -> bool:  # a method, so it is not a --policy-arg option
        return self.mi != "none"

    def _keeps_value_norms(self) -> bool:  # ||v_i||^2 for the torch path of MI "nc" on the attention base
        return self.mi == "nc" and self.base == "attention"

    def check_options(self):
        if self.mi not in MI_KINDS:
            raise ValueError(f"momentkv: unknown mi {self.mi!r}; choose from {', '.join(MI_KINDS)}")
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0 or self.pooling not in ("max", "avg"):
            raise ValueError(f"momentkv: window >= 1, an odd kernel and pooling max or avg "
                             f"(got window={self.window}, kernel={self.kernel}, pooling={self.pooling!r})")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentkv: beta must be in [0, 1) (got {self.beta})")
        if self.recent >= 1.0:
            raise ValueError(f"momentkv: recent is a fraction of the budget, < 1 (got {self.recent}; < 0: the window)")
        if self.carry not in ("best", "own"):
            raise ValueError(f"momentkv: carry must be best or own (got {self.carry!r})")
        if self.vote_mean not in ("window", "token"):
            raise ValueError(f"momentkv: vote_mean must be window or token (got {self.vote_mean!r})")
        if self.base not in ("attention", "keys"):
            raise ValueError(f"momentkv: base must be attention or keys (got {self.base!r})")
        if self.base == "keys" and self.recent < 0:
            raise ValueError("momentkv: base=keys protects the newest tokens by `recent` (>= 0), not SnapKV's window; "
                             f"set recent to a fraction of the budget (got {self.recent})")

    def check_budget(self, budget: int):
        if self.recent >= 0:
            return Policy.check_budget(self, budget)
        if budget < self.window + 1:
            raise ValueError(f"momentkv keeps its prefill observation window of {self.window} tokens: --budget must be "
                             f"at least window + 1 = {self.window + 1} (got {budget}); or lower it with --policy-arg window=N")

    def check_decode_budget(self, decode_budget: int):  # composed (snapkv+momentkv): no window to hold
        Policy.check_budget(self, decode_budget)

    _keep_recent = None  # set by start: the recent window's size at prefill and at decode, [B]
    _raw = _cand = ()  # per layer: unprotected scores of the candidates (prefill_scores) and of the kept (on_select)

    def start(self, keep, pool_budget):
        self._keep_recent = (keep.double() * self.recent).floor().long() if self.recent >= 0 else None
        if self.recent >= 0:  # a buffer, so the compiled decode step reads it without recompiling
            self.pool_recent.copy_((pool_budget.double().clamp(max=2**40) * self.recent).floor().long())
        self._raw = [None] * self.scores.shape[0]
        self._cand = [None] * self.scores.shape[0]

    def on_select(self, layer, idx, keep):
        if len(self._cand) > layer and self._cand[layer] is not None:
            self._raw[layer] = self._cand[layer].gather(-1, idx)

    def allocate(self, num_layers, batch, kv_heads, capacity, device):
        self.register_buffer("scores", torch.zeros(num_layers, batch, kv_heads, capacity, device=device), persistent=False)
        self.register_buffer("pool_recent", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("age", torch.zeros(num_layers, batch, kv_heads, capacity if self.debias else 0, device=device),
                             persistent=False)
        # ||v_i||^2 of every slot, kept as tokens are written: value_distances' one pass over V instead of two
        self.register_buffer("value_norm2", torch.zeros((num_layers, batch, kv_heads, capacity) if self._keeps_value_norms() else (0,),
                                                        device=device), persistent=False)

    def on_prefill(self, layer, kept_scores, kept, cache=None):
        if self._keeps_value_norms() and cache is not None:
            v = cache.v.float()
            self.value_norm2[layer, ..., : v.shape[2]].copy_(torch.linalg.vecdot(v, v))
        s = self.scores[layer]
        s.zero_()
        self.age[layer].fill_(STATIONARY)  # prompt tokens start with a mean attention, not an EMA from 0
        if kept_scores is not None:  # unified: prompt tokens start decode with their prefill score
            kept_scores = torch.where(kept_scores.isfinite(), kept_scores, 0.0)[..., : s.shape[-1]]
            protected = kept_scores >= PROTECT
            if self.carry == "own" and len(self._raw) > layer and self._raw[layer] is not None:
                own = self._raw[layer][..., : s.shape[-1]]
                s[..., : kept_scores.shape[-1]] = torch.where(protected, own, kept_scores)
            else:
                best = torch.where(protected, 0.0, kept_scores).amax(-1, keepdim=True)
                s[..., : kept_scores.shape[-1]] = torch.where(protected, best, kept_scores)

    def prefill_scores(self, layer, keys, values, pos, window_probs, window=None, keep=None, moments=None):
        if self.base == "keys":
            return self._key_prefill_scores(layer, keys, values, pos, keep, moments)
        qw, qpos, ok = window
        with_mi = self.mi != "none" and moments is not None
        # [B, Hkv, W, N]: which window query sees which candidate; built only where something reads it
        allowed = slot_mask(qpos, pos) & ok[:, None, :, None] if with_mi or self.vote_mean == "token" else None
        voters = allowed.sum(2).clamp(min=1).float() if self.vote_mean == "token" else None  # per candidate
        raw = self._per_layer(vote_scores(window_probs, pos, self.kernel, self.pooling, voters))
        if self.recent >= 0:
            base = raw.masked_fill(recent_mask(pos, self._keep_recent), PROTECT)
        else:
            base = self._per_layer(snapkv_scores(window_probs, pos, self.window, self.kernel, self.pooling))
        self._cand[layer] = raw
        if not with_mi:
            return base
        B, Hkv, N = pos.shape
        current = moments.moments(layer)
        reference = self._summary_after(base, keys, values, pos, keep, current)
        if not bool((reference[0] > 0).any()):  # nothing evicted, none before: every cost is 0 (mi_cost's scale)
            return base  # (a prompt within a unified budget, as long generation's: its window's pass is skipped)
        cost = mi_cost_sum(qw, allowed, keys, values, current, reference, self.mi)  # mean over the window's
        if voters is None:
            cost = cost / ok.sum(-1).clamp(min=1)[:, None, None]  # real queries, as the votes
        else:
            cost = cost / voters.repeat_interleave(qw.shape[1] // Hkv, dim=1)
        cost = self._head_mean(cost.view(B, Hkv, -1, N))
        self._cand[layer] = raw + self.mi_weight * cost
        return torch.where(base >= PROTECT, base, base + self.mi_weight * cost)

    def _per_layer(self, scores):
        """per_kv_head=False: one decision per layer, as TOVA and Moment-KV make it (docstring, 5c).
        Every kv head gets the mean over the layer's kv heads of the unprotected scores [..., Hkv, N]
        (protection is by position, the same for every head), so every kv head keeps the same tokens
        in the same slots and decode's mean over all query heads, slot by slot, reads one token."""
        if self.per_kv_head:
            return scores
        protected = scores >= PROTECT
        mean = head_mean(scores.masked_fill(protected, 0.0), dim=-2).unsqueeze(-2).expand(scores.shape)
        return mean.masked_fill(protected, PROTECT)

    def _key_prefill_scores(self, layer, keys, values, pos, keep, moments):
        """base=keys (docstring, 5b): distinctness from the key mean of the summary the eviction
        produces, found as mi="nc" finds its reference: KeyDiff's choice first, its drop set merged
        into the current moments, then every candidate measured against that summary's mean."""
        raw = self._per_layer(key_distinctness(keys, pos))
        protected = recent_mask(pos, self._keep_recent)
        if self.mi != "none" and moments is not None:
            n, mu_k = self._summary_after(raw.masked_fill(protected, PROTECT), keys, values, pos, keep, moments.moments(layer))[:2]
            raw = self._per_layer(key_distinctness(keys, pos, mu_k, n > 0))
        self._cand[layer] = raw
        return raw.masked_fill(protected, PROTECT)

    @staticmethod
    def _summary_after(scores, keys, values, pos, keep, current: Moments) -> Moments:
        """The summary a prefill eviction by `scores` produces: the current moments merged with the
        drop set of keep_top (one fixed-point step: MI and base=keys score against it)."""
        idx, kept = keep_top(scores, pos, keep)
        dropped = (pos >= 0) & ~torch.zeros_like(pos, dtype=torch.bool).scatter(2, idx, kept)
        return merge(current, batch_moments(keys, values, dropped))

    def decode_scores(self, layer, probs, pos, written, query=None, out=None, cache=None, moments=None, attn_scores=None,
                      value=None):
        self.observe(layer, probs, pos, written, query, out, cache, moments, attn_scores, value)
        return self.score_step(layer, pos, written, moments)

    # The engine calls observe at every layer and score_step once for all layers (layer = slice(None)):
    # an eager CPU step pays per op, and the scoring is ~30 elementwise ops that batch over layers.
    scores_at_step_end = True

    def _mi_from_nc(self, moments) -> bool:  # MI read from NC attention's own scores: the fast path
        return self.base == "attention" and self.mi == "nc" and moments is not None and moments.apply_nc

    def fused_score(self, moments):
        if not self._mi_from_nc(moments):
            return None  # plain probabilities; MI alone or "value" run in torch from them
        return self.mi_weight if self.per_kv_head else False  # the kernel averages per kv head only

    def fused_step_end(self, pos, written, observed, pool_from, pool_budget, moments, keys, values) -> bool:
        """score_step(slice(None), ..., observed), then the engine's victim choice, absorb and freeing, in
        one C pass (CPU, eager or compiled: tinyengine/fused.py momentum_step_end); False where it does not apply."""
        S = pos.shape[-1]
        return fused.momentum_step_end(self.scores[..., :S], observed, self.age[..., :S] if self.debias else None, pos,
                                       self.pool_recent if self.recent >= 0 else None, self.beta, PROTECT, pool_from,
                                       pool_budget, written, keys, values,
                                       (moments.n, moments.mu_k, moments.mu_v, moments.C) if moments is not None else None)

    def observe(self, layer, probs, pos, written, query=None, out=None, cache=None, moments=None, attn_scores=None,
                value=None):
        """Keep what this layer's attention gives the step's scoring (per-layer work: what needs the cache).
        value [B, Hkv, 1, D]: the new token's, written into slot `written`."""
        B, Hkv, S = pos.shape
        if self.base == "keys":  # the keys' distinctness from the current summary (docstring, 5b)
            n, mu_k = moments.moments(layer)[:2] if self.mi != "none" and moments is not None else (None, None)
            self._kept[layer] = (self._per_layer(key_distinctness(cache.k, pos, mu_k, None if n is None else n > 0)),)
            return
        if self._mi_from_nc(moments):
            logits, probs_ext = attn_scores  # [B, Hkv, G, S + 1], the virtual slot last
            o = out.float().view(B, Hkv, -1, out.shape[-1])
            self._kept[layer] = (logits, probs_ext, value_products(out, cache.v), o, value.float()[:, :, 0])
            return
        a = received_attention(probs, Hkv, self.per_kv_head)
        if self.mi != "none" and moments is not None:  # MI alone (plain attention) or kind "value": per layer
            allowed = (pos >= 0).unsqueeze(2)  # at decode every cached token precedes the query
            out = out if moments.apply_nc else None  # MI alone: the output NC would give, computed
            cost = mi_cost(query, allowed, cache.k, cache.v, moments.moments(layer), moments.moments(layer), self.mi, out)[:, :, 0]
            a = a + self.mi_weight * self._head_mean(cost.view(B, Hkv, -1, S))
        self._kept[layer] = (a,)

    def _taken(self, layer, S: int, slot_columns: tuple):
        """What observe kept for `layer`, or for every layer (slice) stacked. slot_columns, one per kept
        tensor: None if its last axis is not the slots, else the columns after the slots (the virtual
        slot's: 1), which stay last when a smaller layer's slots are padded (base.stack_layers)."""
        if not isinstance(layer, slice):
            return self._kept.pop(layer)
        layers = self.kept_layers()
        return tuple(torch.stack(ts) if extra is None else stack_layers(ts, S, extra) for extra, ts in zip(slot_columns, zip(*layers)))

    def _head_mean(self, x):  # [..., Hkv, G, S] -> [..., Hkv, S]: over each kv head's group, or over all heads
        if self.per_kv_head:
            return x.mean(-2)
        return head_mean(x.flatten(-3, -2), dim=-2).unsqueeze(-2).expand(*x.shape[:-2], x.shape[-1])

    def score_step(self, layer, pos, written, moments=None, observed=None):
        """Scores from what observe kept, for one layer (pos [B, Hkv, S], written [B, Hkv]) or for
        every layer at once (layer = slice(None), pos [L, B, Hkv, S], written [L, B, Hkv]).
        observed [L, B, Hkv, S]: the fused kernel's head_mean(p) + mi_weight head_mean(c) for every
        layer (`fused_score`; tinyengine/fused.py), in place of what observe keeps."""
        S = pos.shape[-1]
        if observed is not None:
            a = observed[layer]
        elif self._mi_from_nc(moments):  # torch path: NC's terms
            logits, probs, products, out, value = self._taken(layer, S, slot_columns=(1, 1, 0, None, None))
            norm2 = self.value_norm2[layer][..., :S]  # ||v_i||^2, the new token's first
            norm2.scatter_(-1, written.unsqueeze(-1), torch.linalg.vecdot(value, value).unsqueeze(-1))
            d2 = value_distances(out, None, norm2, products)
            cost = mi_cost_decode(probs[..., :S], probs[..., S], logits[..., :S], logits[..., S], d2, moments.n[layer], pos >= 0)
            a = self._head_mean(probs[..., :S]) + self.mi_weight * self._head_mean(cost)
        else:
            (a,) = self._taken(layer, S, slot_columns=(0,))
        s = self.scores[layer][..., :S]  # a layer's cache may be smaller (per-layer budgets)
        age = self.age[layer][..., :S] if self.debias else None
        recent = self.pool_recent if self.recent >= 0 else None
        scores = fused.momentum_scores(s, a, written, self.beta, age, pos, recent, PROTECT)  # eager CPU: one C pass
        if scores is not None:
            return scores
        scores = momentum_update(s, a, written, self.beta, True, age)
        if self.recent >= 0:
            scores = scores.masked_fill(recent_mask(pos, self.pool_recent), PROTECT)
        return scores
