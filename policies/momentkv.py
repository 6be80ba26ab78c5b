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

5. Base scorers. Prefill: SnapKV's score (policies/snapkv.py, same window, kernel and pooling
   options): the window queries' mean attention, pooled, averaged over each kv head's query
   group; the window's own tokens are protected. With mi="none" momentkv keeps exactly SnapKV's
   set. MI is added to the unprotected scores. Decode (momentum-style,
   Eq. 5 of moment-kv-momentum.txt): s_i <- beta s_i + (1 - beta)(a_i + mi_weight c_i), new
   tokens entering at 0, with a_i the attention of the kv head's query group (`per_kv_head`,
   default; False: all heads of the layer, as Moment-KV). The prompt tokens kept by prefill
   start decode with their prefill score, a per-query attention mean, in the same units (the
   protected window tokens with the best kept score of their row and head). Because those are
   already means while a new token's EMA starts at 0, the ranking uses Adam's bias correction
   s / (1 - beta^age) (`debias`, default on; age = steps since the token entered, prompt
   tokens stationary). Without it a new token scores (1 - beta) a on its first step, ~1/33 of
   a prompt token with the same attention, and is evicted at once: on SmolLM2 (512-token
   prompt, 48 teacher-forced steps, budget 128) KL to full 0.40 without, 0.18 with.

6. Pools. `momentkv` alone is unified: prefill compresses the prompt to --budget and decode
   keeps the whole cache within the same --budget, evicting prompt or generated tokens alike.
   Composed, `snapkv+momentkv` freezes snapkv's prompt and manages the generated tokens within
   --decode-budget; `momentkv+momentum` compresses the prompt with MI and decodes with Moment-KV.

7. Measured (SmolLM2-135M, a 512-token prompt from moment-kv-momentum.txt, 48 teacher-forced
   decode steps, unified budget, mean KL to the full cache; a quick check, the tables are
   bench.py's). Observation window 64 (kvpress's SnapKV default; SnapKV's paper uses 32):
       budget 256: evict-only 0.0151, NC 0.0145, MI 0.0093, MI+NC 0.0085  (H2O 0.0105, TOVA 0.025)
       budget 128: evict-only 0.0707, NC 0.0609, MI 0.0611, MI+NC 0.0504  (H2O 0.085, TOVA 0.156)
   With window 32: MI+NC 0.027 at 256 and 0.185 at 128, behind H2O; at budget 64 (window 48)
   MI+NC 0.169 against H2O 0.153. The window's own tokens are kept, so a larger window is also
   a larger recency window, which this continuation task rewards. NC lowers the per-layer
   attention error at every budget; its KL gain is small where the evicted keys spread widely
   (first order in tau q.(k - mu_k), which real keys often exceed).

Ablation (the paper's: NC is worth more than MI, and the two are super-additive), all with the
same base scorer: options {"mi": "none", "nc": False} evict-only, {"mi": "none"} NC alone,
{"nc": False} MI alone, {} MI + NC (see ABLATION). `--correction nc` attaches NC to any other
evicting policy.
"""
from __future__ import annotations

import math

import torch

from policies.base import PROTECT, Policy, keep_top
from policies.correction import Moments, batch_moments, merge
from policies.momentum import STATIONARY, momentum_update, received_attention
from policies.snapkv import snapkv_scores
from tinyengine.attention import slot_mask
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
    """
    B, Hq, T, D = q.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    tau = 1.0 / math.sqrt(D)
    qg = q.float().reshape(B, Hkv, Hq // Hkv * T, D)
    k, v = keys.float(), values.float()
    allowed = allowed.unsqueeze(2).expand(B, Hkv, Hq // Hkv, T, N).reshape(B, Hkv, -1, N)
    logits = (tau * (qg @ k.transpose(-1, -2))).masked_fill(~allowed, float("-inf"))
    lse_k = logits.logsumexp(-1, keepdim=True).clamp(min=-1e30)  # a query that sees nothing: no NaN
    # The current summary's virtual slot: normalizer estimate and corrected output (NC).
    n_c, mk_c, mv_c, C_c = current
    virtual = tau * (qg @ mk_c.unsqueeze(-1)) + n_c.log()[..., None, None]
    lse = torch.logaddexp(lse_k, virtual)
    if out is None:
        w = (virtual - lse).exp()
        out = (1 - w) * ((logits - lse_k).exp() @ v) + w * (mv_c.unsqueeze(-2) + tau * (qg @ C_c.transpose(-1, -2)))
    else:
        out = out.float().reshape(qg.shape)
    n_r, mk_r, mv_r, C_r = reference
    if kind == "nc":
        lbar = tau * (qg @ mk_r.unsqueeze(-1))
        x = torch.where(allowed, logits - lbar, 0.0)
        pbar = (lbar - lse).exp()
        xs = x.clamp(max=1.0)
        small = pbar * (torch.expm1(xs) - xs)  # pbar phi(x), accurate near 0
        large = (logits - lse).exp() - pbar * (1 + x)  # the same for x >= 1, without overflow
        weight = torch.where(x < 1, small, large).clamp(min=0)
        target = out
    elif kind == "value":
        weight = (logits - lse).exp()
        target = mv_r.unsqueeze(-2) + tau * (qg @ C_r.transpose(-1, -2))
    else:
        raise ValueError(f"unknown mi {kind!r}; choose from {', '.join(MI_KINDS)}")
    d2 = ((v * v).sum(-1).unsqueeze(-2) - 2 * (target @ v.transpose(-1, -2)) + (target * target).sum(-1, keepdim=True)).clamp(min=0)
    d2 = d2 * allowed
    rms2 = d2.sum(-1, keepdim=True) / allowed.sum(-1, keepdim=True).clamp(min=1)
    cost = torch.where(allowed, weight * (d2 / rms2.clamp(min=1e-20)).sqrt(), 0.0)
    cost = cost * (n_r > 0)[..., None, None]
    return cost.view(B, Hq, T, N)


class MomentKV(Policy):
    name = "momentkv"
    description = "MomentKV: moments of the evicted set steer eviction (MI) and correct attention (NC)"
    has_prefill = True
    has_decode = True
    needs_probs = True
    needs_query = True  # the engine passes queries, the cache/candidates and the moments
    window = 64  # prefill observation window (queries): kvpress's SnapKV default (docstring, 7)
    kernel = 7  # pooling width over neighbouring slots (odd), as snapkv
    pooling = "max"  # as snapkv: max or avg
    beta = 0.97  # decode momentum
    mi = "nc"  # moment-informed score: nc | value | none
    mi_weight = 1.0
    nc = True  # attach the NC correction (False: MI alone)
    per_kv_head = True  # decode attention averaged per GQA group (False: all query heads)
    debias = True  # rank by s / (1 - beta^age): new tokens compete with the prompt's stationary scores

    def needs_moments(self) -> bool:  # a method, so it is not a --policy-arg option
        return self.mi != "none"

    def check_options(self):
        if self.mi not in MI_KINDS:
            raise ValueError(f"momentkv: unknown mi {self.mi!r}; choose from {', '.join(MI_KINDS)}")
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0 or self.pooling not in ("max", "avg"):
            raise ValueError(f"momentkv: window >= 1, an odd kernel and pooling max or avg "
                             f"(got window={self.window}, kernel={self.kernel}, pooling={self.pooling!r})")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentkv: beta must be in [0, 1) (got {self.beta})")

    def check_budget(self, budget: int):
        if budget < self.window + 1:
            raise ValueError(f"momentkv keeps its prefill observation window of {self.window} tokens: --budget must be "
                             f"at least window + 1 = {self.window + 1} (got {budget}); or lower it with --policy-arg window=N")

    def check_decode_budget(self, decode_budget: int):  # composed (snapkv+momentkv): no window to hold
        Policy.check_budget(self, decode_budget)

    def allocate(self, num_layers, batch, kv_heads, capacity, device):
        self.register_buffer("scores", torch.zeros(num_layers, batch, kv_heads, capacity, device=device), persistent=False)
        self.register_buffer("age", torch.zeros(num_layers, batch, kv_heads, capacity if self.debias else 0, device=device),
                             persistent=False)

    def on_prefill(self, layer, kept_scores, kept):
        s = self.scores[layer]
        s.zero_()
        self.age[layer].fill_(STATIONARY)  # prompt tokens start with a mean attention, not an EMA from 0
        if kept_scores is not None:  # unified: prompt tokens start decode with their prefill score
            kept_scores = torch.where(kept_scores.isfinite(), kept_scores, 0.0)[..., : s.shape[-1]]
            protected = kept_scores >= PROTECT
            best = torch.where(protected, 0.0, kept_scores).amax(-1, keepdim=True)
            s[..., : kept_scores.shape[-1]] = torch.where(protected, best, kept_scores)

    def prefill_scores(self, layer, keys, values, pos, window_probs, window=None, keep=None, moments=None):
        base = snapkv_scores(window_probs, pos, self.window, self.kernel, self.pooling)
        if self.mi == "none" or moments is None:
            return base
        qw, qpos, ok = window
        B, Hkv, N = pos.shape
        current = moments.moments(layer)
        idx, kept = keep_top(base, pos, keep)  # the base scorer's choice; its drop set shapes the summary
        dropped = (pos >= 0) & ~torch.zeros_like(pos, dtype=torch.bool).scatter(2, idx, kept)
        reference = merge(current, batch_moments(keys, values, dropped))
        allowed = slot_mask(qpos, pos) & ok[:, None, :, None]
        cost = mi_cost(qw, allowed, keys, values, current, reference, self.mi).mean(2)  # over the window, as the votes
        cost = cost.view(B, Hkv, -1, N).mean(2)
        return torch.where(base >= PROTECT, base, base + self.mi_weight * cost)

    def decode_scores(self, layer, probs, pos, written, query=None, out=None, cache=None, moments=None):
        Hkv = pos.shape[1]
        a = received_attention(probs, Hkv, self.per_kv_head)
        if self.mi != "none" and moments is not None:
            current = moments.moments(layer)
            allowed = (pos >= 0).unsqueeze(2)  # at decode every cached token precedes the query
            out = out if moments.apply_nc else None  # MI alone: the output NC would give, computed
            cost = mi_cost(query, allowed, cache.k, cache.v, current, current, self.mi, out)[:, :, 0]
            B, Hq, S = cost.shape
            if self.per_kv_head:
                cost = cost.view(B, Hkv, Hq // Hkv, S).mean(2)
            else:
                cost = head_mean(cost, dim=1).unsqueeze(1).expand(B, Hkv, S)
            a = a + self.mi_weight * cost
        s = self.scores[layer][..., : pos.shape[-1]]  # a layer's cache may be smaller (per-layer budgets)
        age = self.age[layer][..., : pos.shape[-1]] if self.debias else None
        return momentum_update(s, a, written, self.beta, True, age)
