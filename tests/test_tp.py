"""Tensor parallelism on real multi-process gloo groups (CPU): same greedy tokens as one process.

Each group is started with torch.multiprocessing.spawn and a file:// rendezvous (no ports to
collide); torchrun itself is exercised end to end on generate.py in the slow tests.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from policies import make_plan
from tinyengine.engine import Engine
from tinyengine.errors import TinyEngineError
from tinyengine.tp import load_sharded_model, parameter_bytes
from tinyengine.weights import load_model

ROOT = Path(__file__).resolve().parent.parent

# The four plans the issue names (and TOVA, the other all-heads average), with budgets small
# enough that every one of them evicts.
REQUIRED = ("full", "momentkv", "momentum", "snapkv+momentum")
PLANS = {
    "full": {},
    "momentkv": {"budget": 20, "options": {"window": 8}},
    "momentum": {"decode_budget": 6},
    "snapkv+momentum": {"budget": 16, "decode_budget": 6, "options": {"window": 8}},
    "tova": {"budget": 20},
}


def available_plans():
    """The specs whose policies exist (test_the_four_plans_exist names the missing ones)."""
    specs = []
    for spec in PLANS:
        try:
            make_plan(spec, **PLANS[spec])
            specs.append(spec)
        except ValueError as e:
            if "unknown policy" not in str(e):
                raise
    return specs


def generate_all(model, specs, prompts, new_tokens, compile=False):
    return {spec: Engine(model, make_plan(spec, **PLANS[spec]), compile=compile).generate(prompts, new_tokens)
            for spec in specs}


# ----------------------------------------------------------------------------- process groups


def _worker(rank, world, store, folder, dtype, specs, prompts, new_tokens, compile, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = load_sharded_model(folder, rank, world, "cpu", getattr(torch, dtype))
        result = {"tokens": generate_all(model, specs, prompts, new_tokens, compile),
                  "bytes": parameter_bytes(model),
                  "local_heads": [model.args.num_heads, model.args.num_kv_heads]}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        from tinyengine.dist import shutdown  # every rank done before the group goes (see shutdown)

        shutdown()


def run_group(tmp_path, world, folder, specs, prompts, new_tokens, dtype="float64", compile=False):
    """Run the specs on `world` spawned ranks; returns each rank's result."""
    store = tmp_path / f"store-{world}"
    out = tmp_path / f"out-{world}"
    out.mkdir()
    mp.spawn(_worker, args=(world, str(store), str(folder), dtype, specs, prompts, new_tokens, compile, str(out)),
             nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _shutdown_worker(rank, world, store, folder, out_dir):
    from tinyengine.dist import shutdown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = load_sharded_model(folder, rank, world, "cpu", torch.float32)
    Engine(model, make_plan("full")).generate([[1, 2, 3]], 2)
    shutdown()
    threads = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(threads))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_shutdown_joins_the_gloo_threads_before_interpreter_exit(tmp_path, tiny_folder):
    """Gloo threads left to the interpreter's exit can abort the rank (see dist.shutdown)."""
    mp.spawn(_shutdown_worker, args=(2, str(tmp_path / "store"), str(tiny_folder), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not [t for t in threads if "gloo" in t], f"rank {rank} still runs {threads} after shutdown()"


# ----------------------------------------------------------------------------- a tiny real checkpoint


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random Llama with 12 query and 6 kv heads (divisible by 2 and 3) saved as a real safetensors folder.
    intermediate_size 100 is not divisible by 3, so the MLP split is uneven there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=12, num_key_value_heads=6, max_position_embeddings=256,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init's: sharper attention, so policies really differ
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def prompts_of(lengths, seed=1, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny_reference(tiny_folder):
    """Single-process tokens (float64, so summation order cannot flip a greedy choice)."""
    prompts = prompts_of([41, 29])
    model = load_model(tiny_folder, dtype=torch.float64)
    specs = available_plans()
    return prompts, specs, generate_all(model, specs, prompts, 24)


@pytest.fixture(scope="module")
def tiny_group(tmp_path_factory, tiny_folder, tiny_reference):
    """world -> each rank's result on the tiny model (one spawn per world size, shared by the tests)."""
    prompts, specs, _ = tiny_reference
    runs = {}

    def get(world):
        if world not in runs:
            runs[world] = run_group(tmp_path_factory.mktemp("tp"), world, tiny_folder, specs, prompts, 24)
        return runs[world]

    return get


@pytest.mark.parametrize("world", [2, 3])
def test_tiny_llama_tokens_equal_one_process(tiny_group, tiny_reference, world):
    _, specs, reference = tiny_reference
    results = tiny_group(world)
    assert all(r["local_heads"] == [12 // world, 6 // world] for r in results)
    for spec in specs:
        for rank, r in enumerate(results):
            assert r["tokens"][spec] == reference[spec], f"{spec} on rank {rank} of {world}"
    # The plans must actually differ, or equality would not show that eviction is in sync.
    evicting = [s for s in specs if s != "full"]
    assert all(reference[s] != reference["full"] for s in evicting), "a plan did not change the output; tighten its budget"


def test_the_four_plans_exist():
    """The equality tests run the plans that exist; this one says which of the four are missing."""
    missing = [s for s in REQUIRED if s not in available_plans()]
    if missing:
        pytest.skip(f"not yet available, so not compared under tensor parallelism: {', '.join(missing)}")


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_holds_a_1_over_n_shard(tiny_group, tiny_folder, world):
    whole_sharded, whole_replicated = parameter_bytes(load_model(tiny_folder, dtype=torch.float64))
    sharded = [r["bytes"][0] for r in tiny_group(world)]
    assert sum(sharded) == whole_sharded  # the shards partition the layers exactly
    for b, replicated in (r["bytes"] for r in tiny_group(world)):
        assert abs(b - whole_sharded / world) <= 0.02 * whole_sharded  # uneven MLP split: within 2%
        assert replicated == whole_replicated


def test_world_not_dividing_kv_heads_is_refused_in_one_line(tiny_folder):
    with pytest.raises(TinyEngineError) as e:
        load_sharded_model(tiny_folder, 0, 4, "cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("tensor parallel over 4 ranks needs num_key_value_heads (6) divisible by 4; "
                   "use --nproc-per-node 1, 2, 3 or 6")


def test_a_shard_run_outside_its_group_is_refused_in_one_line(tiny_folder):
    shard = load_sharded_model(tiny_folder, 0, 2, "cpu")  # loading to inspect needs no group
    with pytest.raises(TinyEngineError, match="only inside its process group: start it with torchrun"):
        Engine(shard, make_plan("full")).generate([[1, 2, 3]], 2)


def test_rank_slices_are_the_matching_blocks(tiny_folder):
    """Rank r's q/k/v rows and o/down columns are the matching blocks of the full tensors."""
    whole = dict(load_model(tiny_folder).named_parameters())
    part = dict(load_sharded_model(tiny_folder, 1, 3, "cpu").named_parameters())
    p = "model.layers.1."
    assert torch.equal(part[p + "self_attn.q_proj.weight"], whole[p + "self_attn.q_proj.weight"][32:64])
    assert torch.equal(part[p + "self_attn.k_proj.weight"], whole[p + "self_attn.k_proj.weight"][16:32])
    assert torch.equal(part[p + "self_attn.o_proj.weight"], whole[p + "self_attn.o_proj.weight"][:, 32:64])
    assert torch.equal(part[p + "mlp.up_proj.weight"], whole[p + "mlp.up_proj.weight"][33:66])
    assert torch.equal(part[p + "mlp.down_proj.weight"], whole[p + "mlp.down_proj.weight"][:, 33:66])
    assert torch.equal(part["lm_head.weight"], whole["lm_head.weight"])


# ----------------------------------------------------------------------------- slow: compile, SmolLM2, torchrun


@pytest.mark.slow
def test_compiled_decode_step_traces_the_all_reduces(tmp_path, tiny_folder, tiny_reference):
    prompts, specs, reference = tiny_reference
    specs = [s for s in ("full", "momentum") if s in specs]
    results = run_group(tmp_path, 2, tiny_folder, specs, prompts, 24, compile=True)
    for spec in specs:
        assert all(r["tokens"][spec] == reference[spec] for r in results), spec


@pytest.fixture(scope="module")
def smollm2():
    from tinyengine.checkpoint import resolve_checkpoint
    from tinyengine.tokenizer import Tokenizer

    folder = resolve_checkpoint("smollm2-135m", progress=False)
    return folder, Tokenizer.from_folder(folder)


LONG = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(12)) + " Item 4 is a"


@pytest.mark.slow
def test_smollm2_three_ranks_equal_one_process(tmp_path, smollm2):
    folder, tok = smollm2
    prompts = [tok.encode(LONG)]
    specs = available_plans()
    whole = load_model(folder)
    reference = generate_all(whole, specs, prompts, 16)
    results = run_group(tmp_path, 3, folder, specs, prompts, 16, dtype="float32")
    for spec in specs:
        assert all(r["tokens"][spec] == reference[spec] for r in results), spec
    # Memory: each rank holds a third of the layers plus the (replicated, tied) embedding.
    whole_sharded, whole_replicated = parameter_bytes(whole)
    for r in results:
        sharded, replicated = r["bytes"]
        assert abs(sharded - whole_sharded / 3) < 0.01 * whole_sharded and replicated == whole_replicated


def torchrun(nproc, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(ROOT / "generate.py"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_torchrun_generate_prints_the_single_process_text(smollm2):
    """The issue's acceptance command: momentkv at budget 128 on a prompt long enough to evict."""
    prompt = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(40)) + " Item 7 is a"
    args = ["--policy", "momentkv", "--budget", "128", "--prompt", prompt, "--max-new-tokens", "12", "--quiet"]
    single = subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=600)
    assert single.returncode == 0, single.stderr
    code, out, err = torchrun(3, *args)
    assert code == 0, err
    assert out == single.stdout  # rank 0 prints, once
    assert out.strip()


@pytest.mark.slow
def test_torchrun_refuses_a_world_not_dividing_the_kv_heads(smollm2):
    code, out, err = torchrun(2, "--prompt", "Hi", "--max-new-tokens", "2")
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("generate.py: error:")]
    assert lines and set(lines) == {
        "generate.py: error: tensor parallel over 2 ranks needs num_key_value_heads (3) divisible by 2; "
        "use --nproc-per-node 1 or 3"}


@pytest.mark.slow
def test_decode_benchmark_runs_under_torchrun(tiny_folder):
    from tinyengine.tp import tp_decode_tokens_per_s

    rates = tp_decode_tokens_per_s(str(tiny_folder), (1, 2), prompt_tokens=16, new_tokens=8)
    assert [rates[n]["ranks"] for n in (1, 2)] == [1, 2]
    assert all(r["decode_tok_s"] > 0 and r["new_tokens"] == 8 for r in rates.values())
    assert rates[2]["weight_bytes_per_rank"] < rates[1]["weight_bytes_per_rank"]
    assert rates[2]["kv_bytes_per_rank"] * 2 == rates[1]["kv_bytes_per_rank"]  # each rank caches half the kv heads
