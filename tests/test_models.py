"""Logits equal transformers' (float32, 1e-4) for every family, loaded from real safetensors folders."""
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import causal_logits, tiny_hf_model, write_tiny_checkpoint

from models import linear_forms
from models.linear_forms import FORMS, TUNED_ROWS, linear, pack
from tinyengine.engine import Engine
from tinyengine.weights import load_model

CASES = [(family, tied, shards) for family in ("llama", "qwen3", "mistral") for tied in (False, True) for shards in (1, 3)]


@pytest.mark.parametrize("family,tied,shards", CASES)
def test_logits_equal_transformers(tmp_path, family, tied, shards):
    hf = tiny_hf_model(family, tied, seed=2 * shards + tied)
    folder = write_tiny_checkpoint(tmp_path / "ckpt", family, tied, shards, model=hf)
    model = load_model(folder)
    assert model.args.family == family and model.args.tie_word_embeddings == tied
    assert not hasattr(model, "lm_head") if tied else torch.equal(model.lm_head.weight, hf.lm_head.weight)
    # 80 tokens: past Llama 3's original context of 64, where its rope scaling matters most.
    tokens = torch.randint(0, hf.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(causal_logits(model, tokens), expected, atol=1e-4, rtol=0)
    # The engine's prefill (SDPA over the cache) gives the same last-token logits.
    engine = Engine(model)
    engine.setup(2, 96)
    last = engine.prefill(tokens, torch.tensor([80, 80]))
    torch.testing.assert_close(last, expected[:, -1], atol=1e-4, rtol=0)


def test_family_specifics_reach_the_model(tmp_path):
    qwen = load_model(write_tiny_checkpoint(tmp_path / "q", "qwen3"))
    assert qwen.args.head_dim == 24 and qwen.args.qk_norm and qwen.model.layers[0].self_attn.q_proj.out_features == 4 * 24
    llama = load_model(write_tiny_checkpoint(tmp_path / "l", "llama"))
    assert llama.args.rope_scaling["rope_type"] == "llama3" and llama.args.rope_theta == 500000.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_on_load(tmp_path, dtype):
    hf = tiny_hf_model("llama")
    model = load_model(write_tiny_checkpoint(tmp_path, model=hf), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.inv_freq.dtype == torch.float32  # RoPE angles stay float32
    torch.testing.assert_close(model.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(dtype))
    tokens = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(causal_logits(model, tokens), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("tied", [False, True])
def test_cpu_weights_are_the_checkpoints(tmp_path, tied):
    """float32 on CPU: every parameter has the checkpoint's values, shape and (row-major) layout,
    so `linear` reads W @ x^T along contiguous rows and safetensors can map the file without a copy."""
    hf = tiny_hf_model("llama", tied)
    model = load_model(write_tiny_checkpoint(tmp_path, "llama", tied, model=hf))
    for name, p in model.named_parameters():
        expected = hf.state_dict()[name]
        assert torch.equal(p, expected) and p.is_contiguous(), name


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17, TUNED_ROWS, TUNED_ROWS + 1])
@pytest.mark.parametrize("form", list(FORMS))
def test_every_linear_form_equals_f_linear(monkeypatch, rows, form):
    """Each form models.linear_forms.linear may take computes F.linear (with and without bias, any
    leading shape, contiguous), and it is taken for up to TUNED_ROWS rows only: run on a packed copy
    of another matrix, only those rows change."""
    monkeypatch.setattr(linear_forms, "FIXED_FORM", form)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 40, generator=g)
    for b in (None, torch.randn(48, generator=g)):
        for shape in [(rows, 40), (1, rows, 40), (rows, 1, 40)]:
            x = torch.randn(*shape, generator=g)
            y = linear(x, w, b, packed=pack(w))
            assert y.shape == (*shape[:-1], 48) and y.is_contiguous()
            torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
            other = linear(x, w, b, packed=pack(-w))
            used = form == "packed" and rows <= TUNED_ROWS
            torch.testing.assert_close(other, F.linear(x, -w if used else w, b), atol=1e-5, rtol=1e-5)


def test_linear_takes_the_measured_form(monkeypatch):
    """linear() looks its form up by (shape, rows, threads, packed?): a table entry saying "packed"
    for one row count runs the packed copy for that count only; without a packed copy, F.linear."""
    monkeypatch.setattr(linear_forms, "FASTEST", {})
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 40, generator=g), torch.randn(3, 40, generator=g)
    linear_forms.FASTEST[linear_forms.key(w, 3, pack(w))] = "packed"
    torch.testing.assert_close(linear(x, w, packed=pack(-w)), F.linear(x, -w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(x[:2], w, packed=pack(-w)), F.linear(x[:2], w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_compiled_graph_bakes_in_the_measured_form(monkeypatch):
    """A compiled product of a few rows takes FASTEST's form for its rows, read once while tracing:
    the graph holds W @ x^T's matmul or F.linear's linear as measured (a "packed" choice: F.linear),
    equal to F.linear to rounding; an entry measured later (another row count) does not recompile it."""
    import torch._dynamo

    monkeypatch.setattr(linear_forms, "FASTEST", {})
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 40, generator=g), torch.randn(2, 40, generator=g)
    graphs = []

    def backend(gm, inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    for form in ("W @ x^T", "F.linear", "packed"):
        torch._dynamo.reset()
        graphs.clear()
        linear_forms.FASTEST[linear_forms.key(w, 2, None)] = form
        step = torch.compile(lambda x: linear(x, w), backend=backend, fullgraph=True)
        torch.testing.assert_close(step(x), F.linear(x, w), atol=1e-5, rtol=1e-5)
        linear_forms.FASTEST[linear_forms.key(w, 5, None)] = "W @ x^T"  # measured after the compile
        step(x + 1)
        assert len(graphs) == 1, f"recompiled: {graphs}"
        linear_op = any("linear" in t for t in graphs[0])
        assert linear_op == (form != "W @ x^T") and any("matmul" in t for t in graphs[0]) == (form == "W @ x^T")


def test_measure_keeps_the_fastest_form(monkeypatch):
    """measure() times each form per matrix shape and keeps the fastest, F.linear unless another is
    MARGIN faster: a form slowed by a sleep is never kept, and F.linear slowed loses to the others."""
    def slowed(fn):
        def run(*a):
            time.sleep(2e-3)
            return fn(*a)
        return run
    g = torch.Generator().manual_seed(0)
    mats = [(torch.randn(32, 16, generator=g), None), (torch.randn(16, 32, generator=g), None)]
    forms = dict(linear_forms.FORMS)
    for slow, expected in [("W @ x^T", "F.linear"), ("F.linear", "W @ x^T")]:
        monkeypatch.setattr(linear_forms, "FASTEST", {})
        monkeypatch.setattr(linear_forms, "FORMS", {**forms, slow: slowed(forms[slow])})
        chosen = linear_forms.measure(mats, rows=2)
        assert set(chosen) == {linear_forms.key(w, 2, None) for w, _ in mats}  # one entry per shape, no "packed"
        assert set(chosen.values()) == {expected} and linear_forms.FASTEST == chosen
        assert linear_forms.measure(mats, rows=2) == {}  # measured once


def test_model_measures_its_decode_rows(monkeypatch, tmp_path):
    """A CPU forward of a few rows measures every weight shape of the model (layers and output) once
    for that row count and thread count, and again once pack_weights adds a form; the logits are
    F.linear's to rounding."""
    monkeypatch.setattr(linear_forms, "FASTEST", {})
    model = load_model(write_tiny_checkpoint(tmp_path / "ckpt", "llama", False))
    tokens = torch.randint(0, model.args.vocab_size, (2, 1), generator=torch.Generator().manual_seed(1))
    engine = Engine(model)
    engine.setup(2, 8)
    with torch.inference_mode():
        engine.prefill(tokens, torch.tensor([1, 1]))
        logits = engine.decode_step(tokens, torch.tensor([[1], [1]]))
    shapes = {tuple(m.shape) for n, m in model.named_parameters() if m.dim() == 2 and "embed" not in n}
    assert {k[:2] for k in linear_forms.FASTEST if k[3] == 2} == shapes
    assert all(k[4] == torch.get_num_threads() and v in linear_forms.FORMS for k, v in linear_forms.FASTEST.items())
    model.pack_weights()  # a new form to measure: the next forward does
    with torch.inference_mode():
        engine.prefill(tokens, torch.tensor([1, 1]))
    assert {k[:2] for k in linear_forms.FASTEST if k[3] == 2 and k[5]} == shapes
    monkeypatch.setattr(linear_forms, "FIXED_FORM", "F.linear")
    engine.setup(2, 8)
    with torch.inference_mode():
        engine.prefill(tokens, torch.tensor([1, 1]))
        torch.testing.assert_close(engine.decode_step(tokens, torch.tensor([[1], [1]])), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_pack_weights_keeps_the_logits(monkeypatch, tmp_path, tied):
    """Transformer.pack_weights: a batched decode step (4 rows) gives the logits of the plain model,
    and really runs on the packed copies: zeroing the weights afterwards changes nothing."""
    monkeypatch.setattr(linear_forms, "FIXED_FORM", "packed")  # (measured, the packed form is taken where fastest)
    model = load_model(write_tiny_checkpoint(tmp_path / "ckpt", "llama", tied))
    tokens = torch.randint(0, model.args.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([12, 12, 10, 7])
    engine = Engine(model)
    engine.setup(4, 16)
    with torch.inference_mode():
        engine.prefill(tokens, lengths)
        expected = engine.decode_step(tokens[:, :1], lengths[:, None])
        engine.prefill(tokens, lengths)
        model.pack_weights()
        for p in model.parameters():
            if p.dim() == 2 and p is not model.model.embed_tokens.weight:  # (the embedding lookup reads the table)
                p.zero_()
        torch.testing.assert_close(engine.decode_step(tokens[:, :1], lengths[:, None]), expected, atol=1e-4, rtol=1e-4)


def test_pack_weights_refuses_what_it_cannot_pack(tmp_path):
    model = load_model(write_tiny_checkpoint(tmp_path / "c", "llama")).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 weights on a CPU"):
        model.pack_weights()
