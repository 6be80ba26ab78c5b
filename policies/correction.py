"""Moments of the evicted set and NC, MomentKV's normalization-corrected attention.

Any evicting policy can carry this (`--correction nc`); `momentkv` carries it by default and
also reads the moments to choose what to evict (MI, see policies/momentkv.py).

Moments (momentkv-moment-statistics.txt, "count, key mean, value mean, value-key covariance").
Per layer, batch row and kv head, over the evicted set E (keys as cached, i.e. after RoPE):

    n = |E|,  mu_k = (1/n) sum_E k_i,  mu_v = (1/n) sum_E v_i,
    C = (1/n) sum_E (v_i - mu_v)(k_i - mu_k)^T          [head_dim x head_dim]

They are updated exactly at every eviction. Two sets A and B combine exactly (Chan, Golub and
LeVeque's parallel formula; one token is the set B = {(k, v)}, which is Welford's update):

    n = n_A + n_B,  f_A = n_A / n,  f_B = n_B / n,  d_k = mu_k^B - mu_k^A,  d_v = mu_v^B - mu_v^A
    mu_k = mu_k^A + f_B d_k,   mu_v = mu_v^A + f_B d_v
    C = C_A + f_B (C_B - C_A) + f_A f_B d_v d_k^T

(the co-moment n C adds the two co-moments plus n_A n_B / n d_v d_k^T). Written this way an
empty B (f_B = 0) leaves A bit for bit unchanged, so evicting an empty slot is a no-op by
masking, with no branch on data.

NC. With tau = 1/sqrt(head_dim) and a query q, the evicted tokens would have added to the
softmax the normalizer Z_E = sum_E exp(tau q.k_i) and the numerator N_E = sum_E exp(tau q.k_i) v_i.
Expanding exp(tau q.k_i) = exp(tau q.mu_k) (1 + x_i + O(x_i^2)), x_i = tau q.(k_i - mu_k), and
using sum_E (k_i - mu_k) = 0:

    Z_E ~ n exp(tau q.mu_k)                                   (exact to first order)
    N_E ~ exp(tau q.mu_k) sum_E (1 + x_i) v_i = Z_E (mu_v + tau C q)

because sum_E v_i (k_i - mu_k)^T = sum_E (v_i - mu_v)(k_i - mu_k)^T = n C. With the retained
slots' normalizer Z_K and output o_K the corrected output is

    o = (Z_K o_K + Z_E (mu_v + tau C q)) / (Z_K + Z_E) = o_K + w_E (mu_v + tau C q - o_K),
    w_E = Z_E / (Z_K + Z_E) = sigmoid(tau q.mu_k + log n - lse_K),  lse_K = log Z_K.

That is a virtual slot with key mu_k, value mu_v and score bias log n (the zeroth order, which
fixes the normalization exactly when the evicted keys are all equal), plus the first-order
term w_E tau C q. Every retained slot's probability becomes p_i (1 - w_E). With nothing
evicted, log n = -inf, w_E = 0 and the output is the plain attention bit for bit. The error
that remains is exact and per token (used by MI):

    o_true - o = sum_E r_i (v_i - o) / Z,   r_i = exp(tau q.mu_k) (e^{x_i} - 1 - x_i) >= 0.

Three ways to compute it, one number:
  - flex (CUDA, when no probabilities are needed): FlexAttention over the cache returns (o_K,
    lse_K) with return_lse=True, and `nc_merge` applies the formula above.
  - reference (CPU, and any backend when the policy needs the probabilities): the virtual slot's
    score tau q.mu_k + log n is appended to the slots' scores and one softmax covers both, so
    w_E is the virtual slot's probability and the retained slots' probabilities come out already
    scaled by 1 - w_E; the value mu_v rides along as that slot's value and the first-order term
    w_E tau C q is one fused multiply-add. A few ops on top of plain attention, which is what a
    CPU decode step pays for (its cost is per op). The scores and probabilities are returned:
    MomentKV's MI at decode reads them instead of taking a second pass over the keys.
  - the fused CPU kernel (tinyengine/decode_kernel.c; eager or compiled decode in float32 on a
    CPU): the same softmax over the slots and the virtual slot, one pass per kv head; it also
    computes the moments' update at each step's evictions (`absorb_slots`, eager).
Compiled flex on CPU cannot return the LSE, so the CPU path is the reference one or the kernel.

Where NC applies: every decode step once anything was evicted (after a compressed prefill, or
once a decode pool overflows), and at prefill in every chunk after the first (chunked prefill
evicts after each chunk, and the later chunks' queries come after every evicted token, so they
all see the virtual slot). The first chunk has nothing evicted. On CPU a corrected prefill
chunk uses the reference softmax: chunk x (budget + chunk) scores per head, instead of sdpa.

Honest budgets: the moments cost head_dim^2 + 2 head_dim + 1 floats per kv head per layer
(`moment_floats`), stored in float32 (Welford in bf16 would drift). `reserved_tokens` converts
them into cache slots of the engine's dtype; with `count_in_budget` the plan gives those slots
up (CachePlan.reserved), and Engine.state_bytes() counts the moments.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from tinyengine import fused
from tinyengine.attention import attention_logits, reference_attention

Moments = tuple  # (n [...], mu_k [..., D], mu_v [..., D], C [..., D, D]), float32


def moment_floats(head_dim: int) -> int:
    """Floats the moments take per kv head per layer: C, mu_k, mu_v and n."""
    return head_dim * head_dim + 2 * head_dim + 1


def batch_moments(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> Moments:
    """Moments of the entries where mask is True: keys, values [..., N, D], mask [..., N].

    Two passes (means first, then centred products), so C is accurate. No entries: all zeros.
    """
    w = mask.float()
    n = w.sum(-1)
    inv = 1.0 / n.clamp(min=1.0)
    k, v = keys.float(), values.float()
    mu_k = (w.unsqueeze(-1) * k).sum(-2) * inv.unsqueeze(-1)
    mu_v = (w.unsqueeze(-1) * v).sum(-2) * inv.unsqueeze(-1)
    dk = (k - mu_k.unsqueeze(-2)) * w.unsqueeze(-1)
    dv = v - mu_v.unsqueeze(-2)
    C = (dv.transpose(-1, -2) @ dk) * inv[..., None, None]
    return n, mu_k, mu_v, C


def merge(a: Moments, b: Moments) -> Moments:
    """Exact moments of the union of two disjoint sets (see the module docstring)."""
    na, mka, mva, Ca = a
    nb, mkb, mvb, Cb = b
    n = na + nb
    inv = 1.0 / n.clamp(min=1.0)
    fa, fb = na * inv, nb * inv  # both 0 when the union is empty
    dk, dv = mkb - mka, mvb - mva
    mu_k = mka + fb.unsqueeze(-1) * dk
    mu_v = mva + fb.unsqueeze(-1) * dv
    C = Ca + fb[..., None, None] * (Cb - Ca) + (fa * fb)[..., None, None] * (dv.unsqueeze(-1) * dk.unsqueeze(-2))
    return n, mu_k, mu_v, C


def nc_merge(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, moments: Moments):
    """Correct attention over the retained slots with the evicted set's moments.

    q, out [B, Hq, T, D]; lse [B, Hq, T] (natural log) of the retained slots' scores;
    moments of one layer [B, Hkv, ...]. Returns (corrected out, w_E [B, Hq, T]).
    """
    n, mu_k, mu_v, C = moments
    B, Hq, T, D = q.shape
    Hkv = n.shape[1]
    tau = 1.0 / math.sqrt(D)
    qg = q.float().reshape(B, Hkv, Hq // Hkv * T, D)
    virtual = tau * (qg @ mu_k.unsqueeze(-1)).squeeze(-1) + n.log().unsqueeze(-1)  # log n = -inf when empty
    w = torch.sigmoid(virtual - lse.float().reshape(B, Hkv, -1))
    predicted = mu_v.unsqueeze(-2) + tau * (qg @ C.transpose(-1, -2))  # mu_v + tau C q
    w, predicted = w.view(B, Hq, T), predicted.view(B, Hq, T, D)
    corrected = out + (w.unsqueeze(-1) * (predicted - out.float())).to(out.dtype)
    return corrected, w


def nc_attention(q, k, v, q_pos, kv_pos, moments: Moments, backend: str = "reference", need_probs: bool = True):
    """Attention over cache slots plus the NC correction: (out, probs or None, w_E, scores or None).

    probs [B, Hq, T, S] are the retained slots' probabilities under the corrected softmax (they
    sum to 1 - w_E). scores = (logits, probs_ext), both [B, Hkv, G * T, S + 1]: the scaled scores
    over the slots (tinyengine.attention.attention_logits, -inf on empty slots) with the virtual
    slot's score tau q.mu_k + log n appended last, and their softmax; MomentKV's decode-time MI
    reads them. backend "flex" on CUDA without need_probs takes the LSE from FlexAttention;
    everything else uses the reference softmax over the slots and the virtual slot together.
    """
    B, Hq, T, D = q.shape
    if backend == "flex" and q.is_cuda and not need_probs:
        out, lse = flex_with_lse(q, k, v, q_pos, kv_pos)
        out, w = nc_merge(q, out, lse, moments)
        return out, None, w, None
    n, mu_k, mu_v, C = moments
    Hkv, S = k.shape[1], k.shape[2]
    tau = 1.0 / math.sqrt(D)
    logits = attention_logits(q, k, q_pos, kv_pos)  # [B, Hkv, GT, S]
    GT = logits.shape[2]
    qg = q.float().reshape(B * Hkv, GT, D)
    # The virtual slot (module docstring): key mu_k, score bias log n (-inf with nothing evicted, so
    # its probability is exactly 0 and, being last, it leaves the softmax of the slots bit for bit).
    virtual = torch.baddbmm(n.log().view(B * Hkv, 1, 1), qg, mu_k.view(B * Hkv, D, 1), alpha=tau)
    logits = torch.cat([logits, virtual.view(B, Hkv, GT, 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1)
    out = (probs[..., :S].to(v.dtype) @ v).float()
    predicted = torch.baddbmm(mu_v.view(B * Hkv, 1, D), qg, C.view(B * Hkv, D, D).transpose(-1, -2), alpha=tau)  # mu_v + tau C q
    out = out.addcmul_(probs[..., S:], predicted.view(B, Hkv, GT, D)).to(v.dtype)
    return out.view(B, Hq, T, D), probs[..., :S].view(B, Hq, T, S), probs[..., S].view(B, Hq, T), (logits, probs)


def flex_with_lse(q, k, v, q_pos, kv_pos):
    """FlexAttention over slots with the slot rule of tinyengine.attention, returning (out, lse)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        p = kv_pos[b, h // G, kv_idx]
        return (p >= 0) & (p <= q_pos[b, q_idx])

    block_mask = create_block_mask(mask_mod, B, Hq, T, k.shape[2], device=q.device)
    flex = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():  # eager flex is a slow reference (prefill)
        global _compiled_flex
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        flex = _compiled_flex
    return flex(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)


_compiled_flex = None


class Correction(nn.Module):
    """Per-layer moments of the evicted set [L, B, Hkv, ...] and, when `apply`, NC attention.

    The engine calls `absorb` with each prefill chunk's dropped candidates, `absorb_slots` with
    each decode step's victims, and `attention` for every attention over the cache. With apply=False
    (MomentKV's "MI alone") the moments are kept for the policy and attention is plain.
    """

    name = "nc"

    def __init__(self, apply: bool = True, count_in_budget: bool = False):
        super().__init__()
        self._views = None  # each layer's (n, mu_k, mu_v, C), views of the buffers (allocate)
        self.apply_nc = apply
        self.count_in_budget = count_in_budget

    # ---- state
    def allocate(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, device):
        shape = (num_layers, batch, kv_heads)
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("n", torch.zeros(shape, **f32), persistent=False)
        self.register_buffer("mu_k", torch.zeros(shape + (head_dim,), **f32), persistent=False)
        self.register_buffer("mu_v", torch.zeros(shape + (head_dim,), **f32), persistent=False)
        self.register_buffer("C", torch.zeros(shape + (head_dim, head_dim), **f32), persistent=False)
        self._views = [(self.n[i], self.mu_k[i], self.mu_v[i], self.C[i]) for i in range(num_layers)]

    def reset(self):
        for b in (self.n, self.mu_k, self.mu_v, self.C):
            b.zero_()

    def moments(self, layer: int) -> Moments:
        if self._views is not None and not torch.compiler.is_compiling():  # eager: views made once (updates are in place)
            return self._views[layer]
        return self.n[layer], self.mu_k[layer], self.mu_v[layer], self.C[layer]

    def _store(self, layer: int, m: Moments):
        for buf, new in zip((self.n, self.mu_k, self.mu_v, self.C), m):
            buf[layer].copy_(new)

    @staticmethod
    def reserved_tokens(head_dim: int, slot_bytes: int) -> int:
        """Cache slots (K, V and position of one token per kv head) the float32 moments cost."""
        return math.ceil(moment_floats(head_dim) * 4 / slot_bytes)

    # ---- updates
    def absorb(self, layer: int, keys, values, mask):
        """Add the entries where mask [B, Hkv, N] is True (keys, values [B, Hkv, N, D]): a batch merge."""
        self._store(layer, merge(self.moments(layer), batch_moments(keys, values, mask)))

    def absorb_slots(self, slots, keys, values, pos, kernel: bool = True):
        """Add, in every layer at once, the token held in slot `slots[l]` [B, Hkv] of layer l; keys,
        values: every layer's cache, a list of [B, Hkv, S_l, D]; pos [L, B, Hkv, S] is the slots'
        positions (an empty slot, position -1, adds nothing). Eager on a CPU: one C pass
        (tinyengine/fused.py); its reference is the torch code below (kernel=False).

        One update over the stacked [L, ...] moments, so a decode step's eviction costs a dozen
        ops, not a dozen per layer. It is `merge` with B = one token (Welford), written in place:
        with f_B = 1/n, f_A = 1 - f_B, d = token - mean,
            mu += f_B d,   C += f_B (f_A d_v d_k^T - C)
        so C [L, B, Hkv, D, D], by far the largest buffer, takes one batched outer product and one
        fused multiply-add (the general merge made eight passes over it and a copy back: 1.3 ms
        per step for SmolLM2, more than the step's attention). An empty slot has f_B = 0 and adds
        exact zeros: the moments stay bit for bit unchanged, with no branch."""
        if kernel and fused.absorb_slots(slots, keys, values, pos, self.n, self.mu_k, self.mu_v, self.C):  # eager CPU: one C pass
            return
        D = self.mu_k.shape[-1]
        idx = slots[..., None, None].expand(-1, -1, -1, 1, D)
        k = torch.stack([c.gather(2, idx[i]) for i, c in enumerate(keys)]).squeeze(3).float()
        v = torch.stack([c.gather(2, idx[i]) for i, c in enumerate(values)]).squeeze(3).float()
        valid = (pos.gather(3, slots.unsqueeze(-1)).squeeze(3) >= 0).float()
        self.n.add_(valid)
        f_b = valid / self.n.clamp(min=1.0)
        f_a = 1.0 - f_b
        d_k, d_v = k - self.mu_k, v - self.mu_v
        self.mu_k.addcmul_(f_b.unsqueeze(-1), d_k)
        self.mu_v.addcmul_(f_b.unsqueeze(-1), d_v)
        C = self.C.view(-1, D, D)
        step = torch.baddbmm(C, (f_a.unsqueeze(-1) * d_v).view(-1, D, 1), d_k.view(-1, 1, D), beta=-1)  # f_A d_v d_k^T - C
        C.addcmul_(f_b.view(-1, 1, 1), step)

    # ---- attention
    def correct(self, layer: int, q, out, lse):
        """NC on an attention output computed elsewhere: out [B, Hq, T, D] and lse [B, Hq, T] of the
        retained slots' scores -> corrected out (no-op where nothing was evicted)."""
        return nc_merge(q, out, lse, self.moments(layer))[0]

    def attention(self, layer: int, q, k, v, q_pos, kv_pos, backend: str = "reference", need_probs: bool = True):
        """(out, probs, scores) over the slots, corrected when apply_nc; probs [B, Hq, T, S] or None;
        scores: nc_attention's (logits, probs_ext) for MomentKV's decode-time MI, or None."""
        if not self.apply_nc:
            if need_probs or backend == "reference":
                return *reference_attention(q, k, v, q_pos, kv_pos), None
            from tinyengine.attention import attention

            return attention(q, k, v, q_pos, kv_pos, backend=backend), None, None
        out, probs, _, scores = nc_attention(q, k, v, q_pos, kv_pos, self.moments(layer), backend, need_probs)
        return out, probs, scores
