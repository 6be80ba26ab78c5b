"""PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling").

Prefill only. SnapKV's scores (policies/snapkv.py), but each layer keeps its own number of
entries: lower layers, whose attention is spread wide, keep more; upper layers, whose attention
is concentrated, keep fewer; the total equals SnapKV's at the same budget (an arithmetic
sequence across layers). The per-layer budgets are computed as kvpress's PyramidKVPress
(after KVCache-Factory) computes them, with K the average budget (--budget, or the prompt
length times 1 - ratio):

    min = K / beta,  max = 2K - min;  if max >= T - window: max = T - window, min = 2K - max
    layer l keeps round(max - l (max - min) / (L - 1))
    and every layer keeps K when not (T >= max >= min >= window) (too short a prompt).

Each layer's cache is allocated at its own budget (+ the generated tokens), so the memory saved
is real: the total is the uniform one, not L times the largest layer's.

Difference, on purpose: with --ratio kvpress takes K = T (1 - ratio) as a real number, we take
the integer number of entries kept (int(T (1 - ratio)), as every other ratio policy); the
budgets agree whenever T (1 - ratio) is an integer.
"""
from __future__ import annotations

from policies.snapkv import SnapKV


class PyramidKV(SnapKV):
    name = "pyramidkv"
    description = "PyramidKV: SnapKV scores, more entries in lower layers, same total (prefill only)"
    beta = 20  # steepness: the top layer keeps K / beta (PyramidKV's default)

    def check_options(self):
        super().check_options()
        if self.beta < 1:
            raise ValueError(f"pyramidkv: beta must be at least 1 (got {self.beta})")

    def layer_keep(self, layer: int, num_layers: int, keep: int, length: int) -> int:
        low = keep / self.beta
        high = 2 * keep - low
        if high >= length - self.window:
            high = length - self.window
            low = 2 * keep - high
        if not length >= high >= low >= self.window:
            return keep
        step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
        return round(high - layer * step)
