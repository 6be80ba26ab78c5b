"""The engine on a tiny random Llama: equal to transformers, batches, chunks, compile, sampling."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.llama import ModelArgs, Transformer
from policies.base import CachePlan
from tinyengine.engine import Engine, Sampling, sample
from tinyengine.errors import TinyEngineError


def tiny_pair(layers=2, seed=0, context=256):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                      architectures=["LlamaForCausalLM"])
    hf = LlamaForCausalLM(cfg).eval()
    model = Transformer(ModelArgs.from_hf_config(cfg.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=False)
    return hf, model.eval()


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def prompts_of(lengths, seed=1, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_greedy_equals_transformers(pair):
    hf, model = pair
    (prompt,) = prompts_of([13])
    ours = Engine(model).generate([prompt], 24)[0]
    ids = torch.tensor([prompt])
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                         pad_token_id=None, eos_token_id=None)[0, 13:].tolist()
    assert ours == theirs


def test_batch_equals_each_prompt_alone(pair):
    _, model = pair
    prompts = prompts_of([5, 31, 17, 1])
    batched = Engine(model).generate(prompts, 20)
    assert batched == [Engine(model).generate([p], 20)[0] for p in prompts]


def test_distinct_rows():
    from tinyengine.engine import distinct_rows

    tokens = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    assert distinct_rows(tokens[:2], torch.tensor([3, 3])) is None
    first, copy = distinct_rows(tokens, torch.tensor([3, 3, 3, 2, 3]))  # row 3 is a shorter prompt
    assert torch.equal(tokens[first[copy]], tokens) and first[copy].tolist() == [0, 1, 0, 3, 0]


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "momentkv"])
@pytest.mark.parametrize("chunk", [None, 8])
def test_rows_with_one_prompt_score_it_once_and_equal_distinct_rows(pair, policy, chunk):
    """Rows repeating a prompt share its first chunk's scoring attention (Engine.prefill): each
    row still keeps, holds and generates what it does in a batch without repeats."""
    from policies import make_plan

    _, model = pair
    a, b = prompts_of([30, 21])
    options = {"window": 8} if policy != "h2o" else {}
    repeated, plain = (Engine(model, make_plan(policy, budget=16, options=options), prefill_chunk=chunk) for _ in range(2))
    out, alone = repeated.generate([a, b, a, a], 12), plain.generate([a, b], 12)
    assert repeated._distinct is not None and plain._distinct is None  # the shared path ran, and only there
    rows = [0, 1, 0, 0]
    assert out == [alone[r] for r in rows]
    for mine, theirs in zip(repeated.caches, plain.caches):
        assert torch.equal(mine.pos, theirs.pos[rows])
        torch.testing.assert_close(mine.k, theirs.k[rows], atol=1e-5, rtol=1e-5)


SHARED_PROMPT_ROWS = {  # spec -> the plan of row j (rows at different budgets) and the prompt slots they share
    "none": (lambda j: CachePlan(), 40),
    "momentum": (lambda j: dict(decode_budget=8 * (j + 1)), 40),
    "scope": (lambda j: dict(decode_budget=8 * (j + 1), options={"recent": 4}), 40),
    "snapkv+momentum": (lambda j: dict(budget=24, decode_budget=8 * (j + 1), options={"window": 8}), 24),
    "h2o": (lambda j: dict(budget=44 + 4 * j), 0),  # unified: it may evict the prompt, nothing is shared
}


@pytest.mark.parametrize("spec", list(SHARED_PROMPT_ROWS))
def test_rows_with_one_prompt_share_its_slots_at_decode(pair, spec):
    """Rows that share a frozen prompt attend to it once at decode (Engine.shared_slots, read
    from row 0): the same tokens and logits as each row generating alone."""
    from policies import make_plan
    from tinyengine.benchkit import drive

    _, model = pair
    (prompt,) = prompts_of([40])
    row_plan, shared = SHARED_PROMPT_ROWS[spec]
    plans = [row_plan(j) if spec == "none" else make_plan(spec, **row_plan(j)) for j in range(3)]
    engine, seen = Engine(model, plans[-1]), []
    together, _ = drive(engine, [prompt] * 3, None, 20, row_plans=plans, on_logits=lambda t, x: seen.append(x.clone()))
    assert engine.shared_slots == [shared] * 2
    for j, plan in enumerate(plans):
        alone_seen = []
        alone, _ = drive(Engine(model, plan), [prompt], None, 20, on_logits=lambda t, x: alone_seen.append(x.clone()))
        assert together[j] == alone[0], (spec, j)
        assert all(torch.allclose(a[0], b[j], atol=1e-4) for a, b in zip(alone_seen, seen)), (spec, j)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_equals_one_pass(pair, chunk):
    _, model = pair
    prompts = prompts_of([40, 23])
    tokens = torch.zeros(2, 40, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([40, 23])
    one, chunked = Engine(model), Engine(model, prefill_chunk=chunk)
    for e in (one, chunked):
        e.setup(2, 64)
    torch.testing.assert_close(chunked.prefill(tokens, lengths), one.prefill(tokens, lengths), atol=1e-5, rtol=1e-5)


def test_policy_machinery_full_equals_no_policy(pair):
    from policies import make_plan

    _, model = pair
    prompts = prompts_of([9, 30])
    assert Engine(model, make_plan("full")).generate(prompts, 16) == Engine(model, CachePlan()).generate(prompts, 16)


# None: the default on a CPU, the fused kernels as operators (tinyengine/fused.py); reference: the
# torch code, which is the compiled path on CUDA
@pytest.mark.parametrize("backend", [None, "reference"])
def test_compiled_decode_equals_eager_without_recompiles(backend):
    import torch._dynamo

    _, model = tiny_pair(seed=3)
    eager = Engine(model, decode_backend=backend)
    compiled = Engine(model, compile=True, decode_backend=backend)
    for e in (eager, compiled):
        e.setup(2, 96)
    torch._dynamo.reset()
    first = prompts_of([12, 7], seed=2)
    assert compiled.generate(first, 10) == eager.generate(first, 10)
    # After the first compile: other steps, prompt lengths and batch contents reuse the graph.
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed, lengths in [(4, [30, 3]), (5, [1, 50]), (6, [20, 20])]:
            batch = prompts_of(lengths, seed=seed)
            assert compiled.generate(batch, 25) == eager.generate(batch, 25)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("spec, options", [("full", {}), ("momentkv", {"budget": 1200, "options": {"window": 4}})])
def test_compiled_decode_writes_the_cache_in_place(spec, options, backend):
    """The decode step's cache write must stay in place in the compiled graph. Written as
    scatter_, inductor copied each layer's whole K and V into a temporary and back every step:
    `bench.py speed` read compiled decode at batch 8 and a 4K context at half the eager rate
    (25.7 against 52.5 tok/s, BENCHMARKS.md before this test).
    Such a copy needs a buffer of the cache's shape, which the generated code would allocate.
    The fused kernel (the CPU default) is an operator that writes the step's token itself and says
    so: called after torch ops had written the cache, inductor copied the cache around it."""
    import torch._dynamo
    import torch._inductor.config
    from torch._inductor.utils import run_and_get_code

    from policies import make_plan

    model = tiny_pair(layers=1, context=2048)[1]
    engine = Engine(model, make_plan(spec, **options), compile=True, decode_backend=backend)
    engine.setup(2, 1237)  # a capacity no other buffer shares
    torch._dynamo.reset()
    with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False):
        tokens, lengths = torch.tensor(prompts_of([8, 8])), torch.tensor([8, 8])
        engine.prefill(tokens, lengths)
        _, code = run_and_get_code(lambda: engine.decode_step(tokens[:, :1], lengths[:, None]))
    cache_shape = str(tuple(engine.caches[0].k.shape))
    assert cache_shape == "(2, 2, 1237, 16)" and code
    copies = [line.strip() for src in code for line in src.splitlines() if "empty_strided" in line and cache_shape in line]
    assert not copies, f"the compiled decode step copies the KV cache: {copies}"


def test_seeded_sampling_is_reproducible_and_varies(pair):
    _, model = pair
    prompt = prompts_of([8])
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a, b = Engine(model).generate(prompt, 30, s), Engine(model).generate(prompt, 30, s)
    c = Engine(model).generate(prompt, 30, Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=8))
    assert a == b and a != c


def test_sample_filters():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, Sampling(), g), greedy)
    assert torch.equal(sample(logits, Sampling(temperature=1.0, top_k=1), g), greedy)
    assert torch.equal(sample(logits, Sampling(temperature=1.0, top_p=1e-6), g), greedy)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(50):
        draw = sample(logits, Sampling(temperature=2.0, top_k=3), g)
        assert (top3 == draw[:, None]).any(-1).all()


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits.expand(500, -1), Sampling(temperature=0.7), g) for _ in range(8)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.7, -1), atol=0.02, rtol=0)


def test_bad_requests(pair):
    _, model = pair
    e = Engine(model)
    with pytest.raises(TinyEngineError, match="context"):
        e.generate(prompts_of([300]), 5)
    with pytest.raises(TinyEngineError, match="max_new_tokens"):
        e.generate(prompts_of([5]), 0)
    with pytest.raises(TinyEngineError, match="empty prompt"):
        e.generate([[]], 5)


def test_kv_bytes_is_what_is_allocated(pair):
    _, model = pair
    e = Engine(model)
    e.generate(prompts_of([10]), 6)
    a = model.args
    slots = e.capacity
    assert e.kv_bytes() == a.num_layers * slots * a.num_kv_heads * (2 * a.head_dim * 4 + 8)


@pytest.mark.parametrize("module", ["models.llama", "policies", "policies.base", "tinyengine", "tinyengine.engine",
                                    "tinyengine.attention", "tinyengine.tp", "tinyengine.errors"])
def test_every_module_imports_first(module):
    """Any module imported first in a fresh interpreter works (no circular-import traps)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True)


def test_eviction_bookkeeping_runs_once_per_step_not_per_layer():
    """Choosing and freeing victims happens once per decode step over all layers (Engine._free_slots):
    what a policy adds per layer is its own scoring only. Counted in aten ops, which is what an eager
    CPU decode step pays for (a per-layer victim choice adds ~13 more per layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from policies import make_plan

    class CountOps(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def ops(layers, spec):
        _, model = tiny_pair(layers=layers)
        engine = Engine(model, make_plan(spec, budget=16) if spec else None)
        engine.generate(prompts_of([30]), 4)  # the cache is full: every step evicts
        with torch.inference_mode(), CountOps() as count:
            engine.decode_step(torch.tensor([[1]]), torch.tensor([[40]]))
        return count.n

    per_layer = {spec: (ops(6, spec) - ops(2, spec)) / 4 for spec in (None, "streamingllm", "tova", "h2o")}
    extra = {spec: n - per_layer[None] for spec, n in per_layer.items() if spec}
    assert extra["streamingllm"] <= 8 and extra["tova"] <= 8 and extra["h2o"] <= 16, extra
