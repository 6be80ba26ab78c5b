"""Attention over cache slots: one mask rule, three interchangeable backends.

Every query carries its absolute position, every slot the position of the token it holds
(-1 when empty). A query at position p may attend to a slot holding position s iff
0 <= s <= p. That one rule is the causal mask at prefill, the padding mask for batches of
different lengths, the chunked-prefill mask (earlier, compressed chunks plus the current
chunk causally) and the decode mask over a cache whose slots were evicted and reused in any
order. An optional additive bias per slot [B, Hkv, S] carries MomentKV's log-count of the
virtual "evicted mass" slot.

Backends (all equal `reference` on random inputs, see tests/test_attention.py):
  - reference: plain torch softmax; also returns the probabilities that scoring policies need.
  - sdpa: F.scaled_dot_product_attention with a boolean mask (fastest prefill on CPU).
  - flex: FlexAttention with the rule as a block mask and the bias as a score_mod.
  - fused: eager decode (one query per head) in float32 on a CPU, a C kernel (tinyengine/fused.py).
Grouped-query attention never copies K/V: queries of one kv head's group are folded into
the query-length axis.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

BACKENDS = ("reference", "sdpa", "flex", "fused")  # fused: eager decode in float32 on a CPU (tinyengine/fused.py)

# Queries that are padding attend to every valid slot of their row (there is always one), so
# no softmax row is empty and no NaN can leak into the real tokens through padded values.
PAD_QUERY_POS = 2**62


def slot_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
    """q_pos [B, T], kv_pos [B, Hkv, S] -> allowed [B, Hkv, T, S]."""
    kv = kv_pos.unsqueeze(2)
    return (kv >= 0) & (kv <= q_pos[:, None, :, None])


def reference_attention(q, k, v, q_pos, kv_pos, kv_bias=None, shared=0):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] -> (out [B, Hq, T, D], probs [B, Hq, T, S]).

    shared: the first `shared` slots hold the same tokens in every row and every query sees them
    (a prompt the rows share and never evict: parallel samples, or bench.py's budgets as rows).
    They are read once, from row 0, for the queries of all rows folded together, instead of once
    per row: decoding a batch over a long shared prompt reads its K/V once per step.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if shared == 0 or B == 1:
        probs = torch.softmax(attention_logits(q, k, q_pos, kv_pos, kv_bias), dim=-1)
        out = probs.to(v.dtype) @ v
        return out.view(B, Hq, T, D), probs.view(B, Hq, T, S)
    GT = Hq // Hkv * T
    rows = q.reshape(B, Hkv, GT, D).transpose(0, 1).reshape(Hkv, B * GT, D)  # every row's queries, per kv head
    head = (rows @ k[0, :, :shared].transpose(-1, -2)).view(Hkv, B, GT, shared).transpose(0, 1).float() * (1.0 / math.sqrt(D))
    if kv_bias is not None:
        head = head + kv_bias[:, :, None, :shared]
    tail = attention_logits(q, k[:, :, shared:], q_pos, kv_pos[..., shared:], None if kv_bias is None else kv_bias[..., shared:])
    probs = torch.softmax(torch.cat([head, tail], dim=-1), dim=-1).to(v.dtype)  # [B, Hkv, GT, S]
    out = probs[..., shared:] @ v[:, :, shared:]
    folded = probs[..., :shared].transpose(0, 1).reshape(Hkv, B * GT, shared)
    out += (folded @ v[0, :, :shared]).view(Hkv, B, GT, D).transpose(0, 1)
    return out.view(B, Hq, T, D), probs.view(B, Hq, T, S)


def attention_logits(q, k, q_pos, kv_pos, kv_bias=None):
    """Scaled scores over slots, -inf where the slot rule forbids: [B, Hkv, G * T, S] (float32),
    the query heads of each kv head's group folded into the query axis (G = Hq / Hkv)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * T, D)
    scores = (qg @ k.transpose(-1, -2)).view(B, Hkv, G, T, S).float().mul_(1.0 / math.sqrt(D))  # in place: a fresh product
    if kv_bias is not None:
        scores.add_(kv_bias[:, :, None, None, :])
    allowed = slot_mask(q_pos, kv_pos)[:, :, None]
    return scores.masked_fill_(~allowed, float("-inf")).view(B, Hkv, G * T, S)


def query_block(rows: int, row_elems: int, block_bytes: int = 2**24) -> int:
    """Queries per block so that a [rows, block, row_elems] float32 temporary stays near 16 MB.

    Why: glibc serves allocations over 32 MB with fresh mmap'd pages, faulted in and zeroed on
    every use; each elementwise op on a [B, H, 4K, 4K] score tensor then pays that. In blocks
    the temporaries are reused from the heap (the quality suites' run times in BENCHMARKS.md).
    """
    return max(1, block_bytes // (4 * rows * row_elems))


def attention_probs(q, k, q_pos, kv_pos, weight=None, summed=False):
    """The probabilities of `reference_attention` alone (no output), [B, Hq, T, S], in query blocks
    (query_block): what prefill scoring policies read, for up to every query of a long prompt.

    weight [B, T]: scales each query's row (0 drops it). summed: the rows' sum, [B, Hq, 1, S],
    without ever holding all of them (every query of a 4K prompt would be [B, Hq, 4K, 4K]).

    A block attends only up to the last slot any of its queries may see: in a first prefill chunk
    (slots in position order) that is the causal frontier, so all queries of a prompt cost half
    the full square. The slots past it get probability 0, as they would anyway.
    """
    B, Hq, T, D = q.shape
    S = k.shape[2]
    probs = torch.zeros(B, Hq, 1 if summed else T, S, device=q.device)
    step = query_block(B * Hq, S)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        seen = ((kv_pos >= 0) & (kv_pos <= q_pos[:, t0:t1].max())).flatten(0, 1).any(0)  # [S]: by the block's latest query
        end = S - int(seen.flip(0).byte().argmax())  # after the last slot seen
        logits = attention_logits(q[:, :, t0:t1], k[:, :, :end], q_pos[:, t0:t1], kv_pos[..., :end])
        block = torch.softmax(logits, -1).view(B, Hq, t1 - t0, end)
        if weight is not None:
            block = block * weight[:, None, t0:t1, None]
        if summed:
            probs[..., :end] += block.sum(2, keepdim=True)
        else:
            probs[:, :, t0:t1, :end] = block
    return probs


def sdpa_attention(q, k, v, q_pos, kv_pos, kv_bias=None):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    allowed = slot_mask(q_pos, kv_pos)
    if kv_bias is None:
        mask = allowed[:, :, None]
    else:
        bias = kv_bias[:, :, None, None, :].to(q.dtype)
        mask = bias.masked_fill(~allowed[:, :, None], float("-inf"))
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, G * T, D).view(B, Hkv, G, T, D), k[:, :, None], v[:, :, None], attn_mask=mask)
    return out.reshape(B, Hq, T, D)


def causal_attention(q, k, v):
    """The first prefill chunk into an empty cache: slots hold positions 0..T-1 in order, so the
    slot rule is the plain causal mask and SDPA's causal kernel applies (much faster than a
    boolean mask on CPU: the sdpa-causal rows of `bench.py attention`). Right padding keeps it exact for real queries:
    their keys are all real; padded queries see padded keys, and their outputs are never used."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def flex_attention_slots(q, k, v, q_pos, kv_pos, kv_bias=None):
    B, Hq, T, D = q.shape
    S = k.shape[2]
    G = Hq // k.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        p = kv_pos[b, h // G, kv_idx]
        return (p >= 0) & (p <= q_pos[b, q_idx])

    score_mod = None
    if kv_bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + kv_bias[b, h // G, kv_idx]

    block_mask = create_block_mask(mask_mod, B, Hq, T, S, device=q.device)
    return _flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def _flex(*args, **kwargs):
    # Eager flex_attention is a slow reference; inside a compiled decode step it is traced and
    # fused. Outside one (prefill) compile it once, with dynamic shapes so prompt lengths do not
    # recompile.
    if torch.compiler.is_compiling():
        return flex_attention(*args, **kwargs)
    return _compiled_flex(*args, **kwargs)


_compiled_flex = torch.compile(flex_attention, dynamic=False)


def attention(q, k, v, q_pos, kv_pos, kv_bias=None, backend="sdpa"):
    """Attention output [B, Hq, T, D] with the chosen backend."""
    if backend == "reference":
        return reference_attention(q, k, v, q_pos, kv_pos, kv_bias)[0]
    if backend == "sdpa":
        return sdpa_attention(q, k, v, q_pos, kv_pos, kv_bias)
    if backend == "flex":
        return flex_attention_slots(q, k, v, q_pos, kv_pos, kv_bias)
    if backend == "fused" and kv_bias is None:  # one decode query per head, float32 on a CPU, eager
        from tinyengine import fused

        return fused.decode_attention(q, k, v, q_pos[:, -1], kv_pos)[0]
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
