"""Static, preallocated KV cache whose slots are not positions.

Each layer owns K and V buffers [batch, kv_heads, capacity, head_dim] allocated once, plus
`pos` [batch, kv_heads, capacity]: the absolute position of the token held in each slot, or -1
for an empty slot. Keys are stored after RoPE, so a token's key never needs its slot to know
where it came from: attention masks by `pos` (valid and causal), and a policy may evict and
reuse any slot of any kv head independently. All writes go through index tensors, so no shape
ever changes and the decode step compiles once.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device,
                 pos: torch.Tensor | None = None):
        """pos: an existing [batch, kv_heads, capacity] tensor to hold the slot positions in (the
        engine keeps every layer's in one tensor and views it, see Engine.setup)."""
        super().__init__()
        shape = (batch, kv_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if pos is None:
            pos = torch.full(shape[:3], -1, dtype=torch.long, device=device)
        elif pos.shape != shape[:3] or pos.dtype != torch.long:
            raise ValueError(f"pos must be a {list(shape[:3])} int64 tensor (got {list(pos.shape)} {pos.dtype})")
        self.register_buffer("pos", pos.fill_(-1), persistent=False)
        # write()'s row and head indices, made once rather than at every decode step
        self.register_buffer("rows", torch.arange(batch, device=device)[:, None], persistent=False)
        self.register_buffer("heads", torch.arange(kv_heads, device=device)[None, :], persistent=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reset(self):
        self.pos.fill_(-1)

    def valid(self) -> torch.Tensor:
        return self.pos >= 0

    def nbytes(self) -> int:
        """Bytes allocated for K, V and slot positions."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))

    def write(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Decode write: one token per (batch, kv head) into `slot` [B, Hkv].

        k, v: [B, Hkv, D]; pos: [B] (the same position for every head of a row).
        """
        # index_put_, not scatter_: inductor keeps index_put_ on the buffer in place, while a
        # scatter_ made the compiled step copy the layer's whole K and V into a temporary and
        # back at every step (tests/test_engine.py::test_compiled_decode_writes_the_cache_in_place).
        index = (self.rows, self.heads, slot)
        self.k.index_put_(index, k)
        self.v.index_put_(index, v)
        self.pos.index_put_(index, pos[:, None].expand_as(slot))

    def fill(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Prefill write: the first n slots get k, v [B, Hkv, n, D] and pos [B, Hkv, n]; the rest are emptied."""
        n = k.shape[2]
        self.k[:, :, :n] = k
        self.v[:, :, :n] = v
        self.pos[:, :, :n] = pos
        self.pos[:, :, n:] = -1


def first_free_slot(pos: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, S] positions -> [B, Hkv] index of the first empty slot (0 if none is empty)."""
    return (pos < 0).to(torch.int8).argmax(dim=-1)
