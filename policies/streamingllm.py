"""StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

Keep the first `n_sink` tokens of the text (the "attention sinks", Sec. 3.1: the softmax needs
somewhere to put attention it does not want to spend, and the first tokens take it) and a
window of the most recent tokens; everything in between is evicted, oldest first (Sec. 3.2).
With a budget B the window holds B - n_sink tokens.

Unified: the same rule compresses the prompt (the first n_sink and the last B - n_sink prompt
tokens survive, as kvpress's StreamingLLMPress keeps them) and runs every decode step (the
oldest non-sink entry makes room for the new token).

The score is the token's position (newer is better) and PROTECT for the sinks, so the engine's
argmin evicts the oldest non-sink; no attention is needed (`needs_probs = False`), so decode
runs on the fastest attention backend.

Difference from the paper, on purpose: StreamingLLM re-numbers positions inside the cache
(RoPE applied to cache slots, Sec. 3.2); we cache keys after RoPE at their original positions,
as kvpress does without its KeyRerotationPress. Positions beyond the model's context are
therefore not supported (the engine refuses them).
"""
from __future__ import annotations

import torch

from policies.base import PROTECT, Policy


class StreamingLLM(Policy):
    name = "streamingllm"
    description = "StreamingLLM: n_sink first tokens + a window of the most recent ones (unified)"
    aliases = ("streaming_llm",)
    scores_at_step_end = True  # decode_scores is written for one layer or all at once
    n_sink = 4  # the paper's default (Sec. 3.2: four initial tokens suffice)

    def check_options(self):
        if self.n_sink < 0:
            raise ValueError(f"streamingllm: n_sink must be >= 0 (got {self.n_sink})")

    def check_budget(self, budget: int):
        if budget < self.n_sink + 1:
            raise ValueError(f"streamingllm needs a budget of at least n_sink + 1 = {self.n_sink + 1} "
                             f"({self.n_sink} sinks and a window of at least one token; got {budget})")

    def _scores(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.n_sink, PROTECT, pos.float())

    def prefill_scores(self, layer, keys, values, pos, window_probs):
        return self._scores(pos)

    def decode_scores(self, layer, probs, pos, written):
        return self._scores(pos)
