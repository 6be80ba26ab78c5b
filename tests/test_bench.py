"""bench.py: its shortcuts are exact, its tasks are well formed, and `quality --smoke` + `report` write
the expected rows with finite numbers.

The shortcuts (tinyengine/benchkit.py) are what make the quality suites fast enough to run:
a recorded `full` prefill replayed into each policy's prefill, one transformers prefill for every
kvpress press, and one batch holding a policy at several decode budgets. Each is compared here
with the plain path it replaces.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_tiny_checkpoint
from tinyengine.benchspeed import PAIRED

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import tinyengine

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=3)
    model, tok = tinyengine.load(str(folder), progress=False)
    return folder, model, tok


def prompts(n_rows=2, length=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (length - 7 * i,), generator=g).tolist() for i in range(n_rows)]


# ----------------------------------------------------------------------------- exactness of the shortcuts


def test_replayed_prefill_equals_real_prefill_for_every_policy(tiny):
    from policies import POLICIES, make_plan
    from tinyengine.benchkit import ReplayModel, pad, verify_replay
    from tinyengine.engine import Engine

    _, model, _ = tiny
    replay = ReplayModel(model)
    tokens, lengths = pad(prompts(), "cpu")
    checked = []
    for name, cls in POLICIES.items():
        if name == "full" or not cls.has_prefill:
            continue
        for kw in ({"ratio": 0.5}, {"ratio": 0.75}):
            try:
                make_plan(name, **kw)
            except ValueError:
                continue
            assert verify_replay(lambda: Engine(replay, make_plan(name, **kw)), replay, tokens, lengths) is None, (name, kw)
            checked.append(name)
    assert len(set(checked)) >= 1


def test_replay_skips_the_prefill_attention(tiny, monkeypatch):
    """A replayed prefill runs the policy's scoring but none of the prompt's attention outputs
    (they are discarded: the recorded logits stand for them), the causal fast path included."""
    import torch.nn.functional as F

    from policies import make_plan
    from policies.base import CachePlan
    from tinyengine.benchkit import ReplayModel, drive
    from tinyengine.engine import Engine

    _, model, _ = tiny
    replay = ReplayModel(model)
    rows = prompts(2, 64)
    _, tape = drive(Engine(replay, CachePlan()), rows, None, 1, replay=replay, record_window=64)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    for spec in ("knorm", "snapkv"):
        drive(Engine(replay, make_plan(spec, ratio=0.5)), rows, None, 0, tape=tape, replay=replay)
    assert calls == []
    drive(Engine(replay, make_plan("knorm", ratio=0.5)), rows, None, 0)  # the real prefill does call it
    assert calls


def test_replay_detects_a_difference(tiny):
    """verify_replay is not vacuous: a tape of other keys gives other caches."""
    from policies import make_plan
    from policies.base import CachePlan
    from tinyengine.benchkit import ReplayModel, drive
    from tinyengine.engine import Engine

    _, model, _ = tiny
    replay = ReplayModel(model)
    rows = prompts(1, 64)
    _, tape = drive(Engine(replay, CachePlan()), rows, None, 1, replay=replay, record_window=64)
    tape.k[0] = tape.k[0] + 1.0  # corrupt layer 0's keys
    a, b = Engine(replay, make_plan("knorm", ratio=0.5)), Engine(replay, make_plan("knorm", ratio=0.5))
    drive(a, rows, None, 1)
    drive(b, rows, None, 1, tape=tape, replay=replay)
    assert not torch.equal(a.caches[0].k, b.caches[0].k)


def test_teacher_forcing_through_decode_equals_one_prefill(tiny):
    """Feeding forced tokens through decode steps gives the logits of prefilling them."""
    from policies.base import CachePlan
    from tinyengine.benchkit import drive
    from tinyengine.engine import Engine

    _, model, _ = tiny
    (ctx,) = prompts(1, 40)
    cont = prompts(1, 12, seed=1)[0]
    seen = []
    drive(Engine(model, CachePlan()), [ctx], [cont], 0, on_logits=lambda t, x: seen.append(x[0].clone()))
    for t in range(len(cont)):
        out, _ = drive(Engine(model, CachePlan()), [ctx + cont[:t]], None, 1, on_logits=lambda s, x: seen.append(x[0].clone()))
        assert torch.allclose(seen[t], seen[-1], atol=1e-4), t


def test_rows_at_different_decode_budgets_equal_separate_runs(tiny):
    from policies import make_plan
    from tinyengine.benchkit import drive
    from tinyengine.engine import Engine

    _, model, _ = tiny
    (prompt,) = prompts(1, 48)
    for name, kw in (("momentum", lambda db: {"decode_budget": db}), ("h2o", lambda db: {"budget": 48 + db})):
        budgets = [4, 9, 16]
        plans = [make_plan(name, **kw(db)) for db in budgets]
        seen = []
        together, _ = drive(Engine(model, plans[-1]), [prompt] * 3, None, 40, row_plans=plans,
                            on_logits=lambda t, x: seen.append(x.clone()))
        for j, db in enumerate(budgets):
            alone_seen = []
            alone, _ = drive(Engine(model, make_plan(name, **kw(db))), [prompt], None, 40,
                             on_logits=lambda t, x: alone_seen.append(x.clone()))
            assert together[j] == alone[0], (name, db)
            assert all(torch.allclose(a[0], b[j], atol=1e-5) for a, b in zip(alone_seen, seen)), (name, db)
        assert not torch.allclose(seen[-1][0], seen[-1][2], atol=1e-3), name  # the budgets matter at these sizes


def test_rows_at_different_ratios_equal_separate_runs(tiny):
    """RULER runs a prompt-compressing policy's ratios as rows of one batch (Engine.prefill's
    row_plans) over the full prefill's tape repeated once per ratio: each row keeps its own share
    of its prompt and gets the tokens and logits it gets alone from a real prefill, for every such
    policy."""
    from policies import POLICIES, make_plan
    from policies.base import CachePlan
    from tinyengine.benchkit import ReplayModel, drive
    from tinyengine.engine import Engine

    _, model, _ = tiny
    replay = ReplayModel(model)
    *rows, question = prompts(3, 64)
    forced = question[:4]
    _, tape = drive(Engine(replay, CachePlan()), rows, [forced] * 2, 0, replay=replay, record_window=64)
    ratios = [0.25, 0.5, 0.75]
    # The repeated tape shares the recorded queries, keys and values (no copy of every layer's) and tiles
    # a layer's when it is replayed, in the rows' order [all rows] * n, as torch.cat would.
    twice = tape.repeat(3).repeat(2)
    assert twice.copies == 6 and all(a is b for a, b in zip(twice.k + twice.v + twice.q, tape.k + tape.v + tape.q))
    assert torch.equal(twice.tokens, torch.cat([tape.tokens] * 6))
    for got, recorded in zip(twice.layer(1), (tape.q[1], tape.k[1], tape.v[1])):
        assert torch.equal(got, torch.cat([recorded] * 6))
    for name in [n for n, cls in POLICIES.items() if cls.has_prefill and n != "full"]:
        seen = []
        engine = Engine(replay, make_plan(name, ratio=ratios[0]))
        together, _ = drive(engine, rows * 3, [forced] * 6, 10, row_plans=[make_plan(name, ratio=r) for r in ratios for _ in rows],
                            tape=tape.repeat(3), replay=replay, on_logits=lambda t, x: seen.append(x.clone()))
        held = [int((engine.caches[-1].pos[j] >= 0).sum()) for j in range(0, 6, 2)]  # the last layer, every kv head
        assert held[0] > held[1] > held[2], (name, held)  # each row holds its own ratio's share
        for j, r in enumerate(ratios):
            for i, row in enumerate(rows):
                alone_seen = []
                alone, _ = drive(Engine(model, make_plan(name, ratio=r)), [row], [forced], 10,
                                 on_logits=lambda t, x: alone_seen.append(x.clone()))
                assert together[2 * j + i] == alone[0], (name, r, i)
                assert all(torch.allclose(a[0], b[2 * j + i], atol=1e-4) for a, b in zip(alone_seen, seen)), (name, r, i)


def test_fidelity_ratios_in_one_batch_equal_each_ratio_alone():
    """The fidelity suite runs a method's ratios as rows of one batch over the repeated tape: every
    row (KL, top-1, NLL, kept share, per-layer attention error) equals that ratio's run alone,
    for a scoring, an accumulating and the MI+NC policy and the ablation's variants."""
    import bench

    def run(ratios):
        args = bench.parse_args(["quality", "--smoke", "--no-kvpress", "--no-progress", "--suites", "fidelity,ablation",
                                 "--policies", "snapkv,h2o,momentkv", "--ratios", ",".join(map(str, ratios))])
        return bench.suite_fidelity(bench.Bench(args), bench.SIZES["smoke"])

    together = {(r["table"], r["method"], r["ratio"]): r for r in run([0.25, 0.5])}
    alone = {(r["table"], r["method"], r["ratio"]): r for ratio in (0.25, 0.5) for r in run([ratio]) if r["method"] != "full"}
    assert set(alone) < set(together) and len(alone) == 2 * (3 + 4)  # 3 policies and 4 ablation variants x 2 ratios
    for key, a in alone.items():
        t = together[key]
        assert t["kept"] == a["kept"] and t["top1"] == a["top1"], key
        assert math.isclose(t["kl"], a["kl"], rel_tol=1e-3, abs_tol=1e-5) and math.isclose(t["nll"], a["nll"], rel_tol=1e-4), key
        assert all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-5) for x, y in zip(t["rel_err_by_layer"], a["rel_err_by_layer"])), key
    assert together[("fidelity", "snapkv", 0.25)]["kept"] > together[("fidelity", "snapkv", 0.5)]["kept"]


def test_press_bank_equals_kvpress_context_manager(tiny):
    """One prefill for many presses gives each press's own compressed cache."""
    pytest.importorskip("kvpress")
    from transformers import DynamicCache

    from tinyengine.benchkit import KVPRESS_OTHERS, KVPRESS_SHARED, PressBank, load_hf, make_press

    folder, _, _ = tiny
    hf = load_hf(folder)
    ids = torch.tensor([prompts(1, 120)[0]])
    names = list(KVPRESS_SHARED) + list(KVPRESS_OTHERS)
    bank = {f"{n}@{r}": make_press(n, r) for n in names for r in (0.25, 0.5)}
    _, got, full = PressBank(hf, bank).prefill(ids)
    assert full[0][0].shape[2] == 120
    for key, press in bank.items():
        cache = DynamicCache(config=hf.config)
        eager = type(press).__name__ == "ObservedAttentionPress"
        if eager:
            hf.set_attn_implementation("eager")
        with torch.inference_mode(), make_press(*_split(key))(hf):
            hf.model(input_ids=ids, past_key_values=cache)
        if eager:
            hf.set_attn_implementation("sdpa")
        for layer, (k, v) in zip(cache.layers, got[key]):
            assert torch.allclose(layer.keys, k, atol=1e-5) and torch.allclose(layer.values, v, atol=1e-5), key
        assert got[key][0][0].shape[2] < 120


def test_batched_continuation_equals_each_cache_alone(tiny):
    """RULER's kvpress rows continue the caches of equal lengths as one batch (stack_caches): each
    row gets the tokens, and the logits, it gets alone, and stops at its own stop token."""
    pytest.importorskip("kvpress")
    from tinyengine.benchkit import PressBank, hf_continue, load_hf, make_press, stack_caches

    folder, _, _ = tiny
    hf = load_hf(folder)
    ids = torch.tensor([prompts(1, 120)[0]])
    bank = {f"{n}@{r}": make_press(n, r) for n in ("knorm", "snapkv", "streamingllm", "pyramidkv") for r in (0.25, 0.5)}
    first, caches, full = PressBank(hf, bank).prefill(ids)
    caches["full"] = full
    groups = stack_caches(caches)
    assert sorted(n for names, _ in groups for n in names) == sorted(caches)
    assert len(groups) < len(caches) and any(len(names) > 1 for names, _ in groups)
    forced = prompts(1, 5)[0]
    alone = {}
    for name, layers in caches.items():
        seen = []
        (tokens,) = hf_continue(hf, layers, 120, forced, 12, first_logits=first, on_logits=lambda t, x: seen.append(x))
        alone[name] = (tokens, torch.cat(seen))  # logits [steps, V]
    for names, layers in groups:
        seen = []
        got = hf_continue(hf, layers, 120, forced, 12, first_logits=first, on_logits=lambda t, x: seen.append(x))
        logits = torch.stack(seen, 1)  # [B, steps, V]
        for row, name in enumerate(names):
            assert got[row] == alone[name][0], name
            assert torch.allclose(logits[row], alone[name][1], atol=1e-4), name
    # A stop token ends its own row only: the row whose 3rd token it is stops there.
    names, layers = next(g for g in groups if len(g[0]) > 1)
    stop = alone[names[0]][0][2]
    got = hf_continue(hf, layers, 120, forced, 12, stop_ids=[stop], first_logits=first)
    for row, name in enumerate(names):
        mine = alone[name][0]
        assert got[row] == (mine[:mine.index(stop)] if stop in mine else mine), name


def _split(key):
    name, r = key.split("@")
    return name, float(r)


# ----------------------------------------------------------------------------- tasks


def test_ruler_samples_are_well_formed():
    from tinyengine.benchdata import RULER_TASKS, chat_segments, ruler_sample, ruler_score
    from tinyengine.checkpoint import resolve_checkpoint
    from tinyengine.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(resolve_checkpoint("smollm2-135m", progress=False))
    for task in RULER_TASKS:
        s = ruler_sample(task, tok, 1024, seed=5)
        assert s == ruler_sample(task, tok, 1024, seed=5)  # seeded
        ctx, q = chat_segments(tok, s)
        assert 1024 - 200 < len(ctx) + len(q) <= 1024
        for ref in s.references:
            assert ref in s.context and ref not in s.question + s.answer_prefix or task == "vt"
        assert ruler_score(" ".join(s.references).upper(), s.references) == 1.0
        aware, suffix = chat_segments(tok, s, question_aware=True)
        assert s.question in tok.decode(aware) and s.question not in tok.decode(ctx)
        assert tok.decode(suffix).endswith(s.answer_prefix)
    s = ruler_sample("niah_multivalue", tok, 1024, seed=1)
    assert ruler_score(s.references[0] + " and " + s.references[1], s.references) == 0.5


def test_longgen_score_reads_each_section():
    from tinyengine.benchdata import longgen_sample, longgen_score

    s = longgen_sample(3, seed=2)
    assert s == longgen_sample(3, seed=2) and "Question 3: describe record 3." in s.prompt
    r = s.references
    text = (f"Record 1: a {r[0]['color']} {r[0]['item']} owned by {r[0]['owner']} from {r[0]['city']}, with code {r[0]['code']}.\n"
            f"Record 2: a {r[1]['item']} with code {r[1]['code']}.\nRecord 3: nothing here")
    assert longgen_score(text, r) == [1.0, 0.4, 0.0]
    assert longgen_score("", r) == [0.0, 0.0, 0.0]


def test_fidelity_samples_are_prose_and_seeded():
    from tinyengine.benchdata import fidelity_samples, prose_text
    from tinyengine.checkpoint import resolve_checkpoint
    from tinyengine.tokenizer import Tokenizer

    text = prose_text()
    assert len(text) > 100_000 and "    " not in text
    tok = Tokenizer.from_folder(resolve_checkpoint("smollm2-135m", progress=False))
    a = fidelity_samples(tok, 3, 256, 16, seed=1)
    assert a == fidelity_samples(tok, 3, 256, 16, seed=1) and a != fidelity_samples(tok, 3, 256, 16, seed=2)
    assert all(len(c) == 256 and len(x) == 16 for c, x in a)


# ----------------------------------------------------------------------------- the CLI end to end


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_returns_results_in_order_with_notes_progress_and_errors(workers):
    """bench.run_jobs: results in job order whichever finishes first, the jobs' notes and progress
    reach the parent, each forked worker runs one thread, and a job's error is raised in the parent."""
    import os
    import time
    import types

    import bench

    b = types.SimpleNamespace(args=types.SimpleNamespace(workers=workers), notes=["before"], job_seconds=[])
    bar = bench.Progress("jobs", 10)

    def fn(job, tick):
        time.sleep(0.3 if job == 0 else 0)  # the first job finishes last
        b.notes.append(f"job {job}")
        tick(job + 1)
        return job * job, os.getpid(), torch.get_num_threads()

    got = bench.run_jobs(b, bar, [0, 1, 2, 3], fn, str)
    assert [square for square, _, _ in got] == [0, 1, 4, 9]
    assert sorted(b.notes) == ["before", "job 0", "job 1", "job 2", "job 3"]
    seconds = dict(b.job_seconds)  # every job's wall time, by its label: the slow one is job 0
    assert sorted(seconds) == ["0", "1", "2", "3"] and seconds["0"] >= 0.3 > max(seconds["1"], seconds["2"], seconds["3"])
    assert bar.bar.n == 10
    pids = {pid for _, pid, _ in got}
    if workers == 1:
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids and len(pids) == 2 and {threads for _, _, threads in got} == {1}

    def fails(job, tick):
        if job == 2:
            raise ValueError("job 2 failed")
        return job

    with pytest.raises(ValueError, match="job 2 failed"):
        bench.run_jobs(b, bar, [0, 1, 2, 3], fails, str)


def test_run_jobs_fails_when_a_worker_dies_instead_of_waiting_forever():
    """A worker killed mid-job (as by the out-of-memory killer) fails the run with an error that names
    the jobs and the fix; multiprocessing.Pool would replace the worker and wait for the lost job forever."""
    import os
    import signal
    import time
    import types

    import bench

    b = types.SimpleNamespace(args=types.SimpleNamespace(workers=2), notes=[])

    def fn(job, tick):
        if job == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.2)
        return job

    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("run_jobs hung after its worker died"))
    signal.alarm(120)
    try:
        with pytest.raises(RuntimeError, match=r"worker process died while running .*killed.*--workers 1"):
            bench.run_jobs(b, bench.Progress("jobs", 1, False), ["killed", "fine", "also fine"], fn, str)
    finally:
        signal.alarm(0)


def test_run_jobs_starts_the_costliest_first():
    """With a cost, the two workers take the costliest jobs first; results stay in job order. And the
    long-generation estimate ranks momentkv over the other unified policies over the decode-pool ones."""
    import time
    import types

    import bench

    b = types.SimpleNamespace(args=types.SimpleNamespace(workers=2), notes=[])

    def fn(job, tick):
        start = time.monotonic()
        time.sleep(0.2)
        return job, start

    got = bench.run_jobs(b, bench.Progress("jobs", 1, False), [1, 5, 2, 9, 3], fn, str, cost=lambda job: job)
    assert [job for job, _ in got] == [1, 5, 2, 9, 3]
    by_start = [job for job, _ in sorted(got, key=lambda r: r[1])]
    assert set(by_start[:2]) == {9, 5} and by_start[-1] == 1
    cost = bench.longgen_cost
    assert cost("momentkv") > cost("h2o") == cost("tova") == cost("streamingllm") > cost("momentum") == cost("scope")


def test_workers_below_one_is_a_usage_error(capsys):
    import bench

    with pytest.raises(SystemExit) as e:
        bench.parse_args(["quality", "--workers", "0"])
    assert e.value.code == 2 and "--workers 0" in capsys.readouterr().err


def test_workers_and_packed_weights_leave_the_numbers_as_they_are(tmp_path):
    """`quality` with two worker processes and oneDNN-packed weights (the defaults on CPU) gives the
    rows, in the same order, and the notes of one process on plain weights: scores, top-1 and kept
    shares equal; KL, NLL and attention errors within float rounding (the packed kernel sums in
    another order)."""
    import bench

    def run(*extra):
        args = bench.parse_args(["quality", "--smoke", "--no-progress", "--policies", "snapkv,momentkv", "--presses", "knorm",
                                 "--decode-policies", "momentum,h2o", "--out", str(tmp_path / extra[1]), *extra])
        return {json.loads(p.read_text())["suite"]: json.loads(p.read_text()) for p in bench.quality(args)}

    plain, fast = run("--workers", "1", "--no-pack"), run("--workers", "2", "--pack")
    assert set(plain) == set(fast) == {"fidelity", "ruler", "longgen"}
    key = lambda r: (r.get("table"), r["method"], r.get("source"), r.get("ratio"), r.get("decode_budget"))  # noqa: E731
    for suite in plain:
        assert fast[suite]["config"]["workers"] == 2 and fast[suite]["config"]["pack"] is True
        assert fast[suite]["notes"] == plain[suite]["notes"]
        a, c = plain[suite]["rows"], fast[suite]["rows"]
        assert [key(r) for r in a] == [key(r) for r in c] and len(a) > 4
        for x, y in zip(a, c):
            assert all(x.get(f) == y.get(f) for f in ("score", "top1", "kept", "per_question")), (suite, key(x))
            assert all(math.isclose(x[f], y[f], rel_tol=1e-3, abs_tol=1e-5) for f in ("kl", "nll", "rel_err") if f in x), (suite, key(x))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quality_smoke_and_report(tmp_path):
    out, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    cmd = [sys.executable, str(ROOT / "bench.py"), "quality", "--smoke", "--threads", "1", "--no-progress", "--out", str(out),
           "--policies", "snapkv,h2o,momentkv", "--presses", "snapkv,knorm", "--decode-policies", "momentum,h2o"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {json.loads(p.read_text())["suite"]: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(results) == {"fidelity", "ruler", "longgen"}
    for d in results.values():
        assert d["command"].startswith("python bench.py quality --smoke") and d["machine"]["torch"] == torch.__version__
        assert d["date"] and d["size"] == "smoke"

    fid = results["fidelity"]["rows"]
    got = {(r["table"], r["method"], r["source"], r["ratio"]) for r in fid}
    for method in ("snapkv", "h2o", "momentkv"):
        assert ("fidelity", method, "tinyengine", 0.5) in got
    for press in ("snapkv", "knorm"):
        assert ("fidelity", press, "kvpress", 0.5) in got
    assert {r["method"] for r in fid if r["table"] == "ablation"} == {"evict-only", "NC", "MI", "MI+NC"}
    for r in fid:
        assert all(_finite(r[k]) for k in ("kl", "top1", "nll", "kept")), r
        assert r["kl"] >= 0 and 0 <= r["top1"] <= 1
    full = next(r for r in fid if r["method"] == "full" and r["source"] == "tinyengine")
    assert full["kl"] == 0 and full["top1"] == 1
    check = next(r for r in fid if r["table"] == "check")
    assert check["kl"] < 1e-4  # transformers' full cache and ours agree
    assert len(next(r for r in fid if r["method"] == "MI+NC")["rel_err_by_layer"]) == 30

    ruler = results["ruler"]["rows"]
    assert {(r["method"], r["source"]) for r in ruler} >= {("full", "tinyengine"), ("snapkv", "tinyengine"), ("full", "kvpress"), ("knorm", "kvpress")}
    assert all(0 <= r["score"] <= 1 for r in ruler)

    lg = results["longgen"]["rows"]
    assert {(r["method"], r["decode_budget"]) for r in lg} == {("full", None), ("momentum", 8), ("momentum", 12), ("h2o", 8), ("h2o", 12)}
    assert all(_finite(r["kl"]) and _finite(r["score"]) for r in lg)
    assert next(r for r in lg if r["method"] == "h2o")["parity"] == "total capacity"
    jobs = dict(results["longgen"]["job_seconds"])  # one job per decode policy, timed
    assert set(jobs) == {"momentum at decode budgets 8,12", "h2o at decode budgets 8,12"} and all(s > 0 for s in jobs.values())

    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "report", "--out", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = md.read_text()
    for heading in ("### Fidelity", "### MomentKV ablation", "### RULER-style retrieval", "### Long generation"):
        assert heading in text
    assert "| snapkv (kvpress) |" in text and "| momentkv |" in text and "| MI+NC |" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    for png in ("fidelity_kl.png", "ruler.png", "longgen_kl.png", "ablation_layers.png"):
        assert (tmp_path / "docs" / "bench" / png).stat().st_size > 1000


def test_attention_smoke_times_every_linear_form_and_the_engines_choice(tmp_path):
    """`bench.py attention`: the linear table has each form of models/linear_forms.py and the engine's
    (measured) choice for every matrix shape of the model, all equal to F.linear to rounding, and the
    report names the forms chosen."""
    out, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    cmd = [sys.executable, str(ROOT / "bench.py"), "attention", "--smoke", "--no-progress", "--out", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("attention-*.json")
    d = json.loads(path.read_text())
    lin = [r for r in d["rows"] if r["table"] == "linear"]
    assert {(r["rows"], r["form"]) for r in lin} == {(n, f) for n in (1, 2) for f in ("F.linear", "W @ x^T", "packed", "tinyengine")}
    assert all(r["ms"] > 0 and r["max_abs_err"] < 1e-3 for r in lin)
    for r in lin:
        if r["form"] == "tinyengine":  # SmolLM2: q/o, k/v, gate/up, down and the output layer
            assert set(r["chosen"]) == {"576x576", "192x576", "1536x576", "576x1536", "49152x576"}
            assert set(r["chosen"].values()) <= {"F.linear", "W @ x^T", "packed"}
    from tinyengine.benchreport import section_attention
    text = section_attention(d)
    assert "| rows | F.linear ms | W @ x^T ms | packed ms | tinyengine ms | speed-up | forms chosen |" in text
    assert "49152x576 " in text


def test_flat_cost_smoke_times_each_policy_against_full_holding_its_budget(tmp_path):
    """`bench.py speed --parts flat`: full at every context, each policy at the larger one, and
    each policy's overhead from rounds timed in alternation with full holding the same tokens."""
    out, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    cmd = [sys.executable, str(ROOT / "bench.py"), "speed", "--smoke", "--parts", "flat", "--policies", "h2o,momentkv,momentum",
           "--no-kvpress", "--no-progress", "--out", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("flatcost-*.json")
    rows = json.loads(path.read_text())["rows"]
    full = {r["context"]: r for r in rows if r["method"] == "full"}
    assert sorted(full) == [64, 256] and all(r["decode_tok_s"] > 0 for r in full.values())
    policies = {r["method"]: r for r in rows if r["method"] != "full"}
    assert set(policies) == {"h2o", "momentkv", "snapkv+momentum"}  # momentum is decode-only: composed to hold the budget
    for r in policies.values():
        assert r["context"] == 256 and r["paired_median_steps"] == PAIRED * 4  # half the smoke size's 8, PAIRED times
        assert r["kv_bytes"] < full[256]["kv_bytes"]  # it holds its budget, not the context
        assert r["vs_full_same_tokens"] == pytest.approx(r["decode_tok_s"] / r["full_same_tokens_tok_s"])
        assert 0.1 < r["vs_full_same_tokens"] < 10
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "report", "--out", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = md.read_text()
    assert f"timed in alternation step by step ({PAIRED * 4} steps each" in text and "| momentkv | eager |" in text


def test_policy_specs_and_the_runtime_replay_check(tiny):
    import bench

    folder, _, _ = tiny
    args = bench.parse_args(["quality", "--checkpoint", str(folder), "--no-progress",
                             "--policies", "snapkv{window=8;kernel=3},h2o:nc,nosuch"])
    assert args.policies == ["snapkv{window=8;kernel=3}", "h2o:nc", "nosuch"]
    assert bench.parse_spec("snapkv{window=8;kernel=3}:nc") == ("snapkv", {"window": "8", "kernel": "3"}, "nc")
    b = bench.Bench(args)
    assert b.prefill_policies() == ["snapkv{window=8;kernel=3}", "h2o:nc"] and any("nosuch" in n for n in b.notes)
    plan = b.plan("snapkv{window=8;kernel=3}", ratio=0.5)
    assert plan.prefill.window == 8 and plan.prefill.kernel == 3
    assert b.plan("snapkv", decode_budget=4) is None and "snapkv skipped" in b.notes[-1]
    prompt = prompts(1, 100)[0]
    for spec in ("snapkv{window=8;kernel=3}", "h2o:nc"):
        assert b.replay_ok(spec, lambda: b.plan(spec, ratio=0.5), prompt) is True  # default size: checked for real
    assert set(b._replay_checked) == {"snapkv{window=8;kernel=3}", "h2o:nc"}


def test_report_states_the_quality_run_time_against_the_target():
    from tinyengine.benchreport import quality_time

    run = lambda s, cmd="python bench.py quality", size="default": {"elapsed_s": s, "command": cmd, "size": size}  # noqa: E731
    line = quality_time({"fidelity": run(600), "ruler": run(900), "longgen": run(1200)})[0]
    assert "in all **45.0 min**" in line and "not met" in line and "separate" not in line
    flags = "python bench.py quality --no-progress --out /tmp/r"
    assert "separate" not in quality_time({s: run(60, flags) for s in ("fidelity", "ruler", "longgen")})[0]
    line = quality_time({"fidelity": run(600), "ruler": run(600, "python bench.py quality --suites ruler"), "longgen": run(60)})[0]
    assert "21.0 min" in line and ": met" in line and "separate commands" in line
    assert quality_time({"fidelity": run(1), "ruler": run(1, size="quick"), "longgen": run(1)}) == []
    parallel = {**run(60), "config": {"workers": 2, "pack": True}}
    assert "min**, 2 worker processes, packed weights (" in quality_time({"fidelity": run(60), "ruler": run(60), "longgen": parallel})[0]
    # What the time is made of, from the jobs' recorded times: the longest first, the rest counted.
    timed = {**run(1200), "job_seconds": [["tova", 120.0], ["momentkv", 600.0], ["h2o", 300.0], ["scope", 60.0]]}
    jobs = quality_time({"fidelity": run(600), "ruler": run(900), "longgen": timed})[2]
    assert jobs.endswith("long generation: 4 jobs, 18.0 worker-min; longest momentkv 10.0, h2o 5.0, tova 2.0.")
    assert "fidelity" not in jobs and "RULER" not in jobs  # (runs without job times)
    assert len(quality_time({"fidelity": run(600), "ruler": run(900), "longgen": run(1200)})) == 2  # none: no line


def test_report_ruler_parity_names_equal_and_different_methods():
    from tinyengine.benchreport import ruler_parity

    row = lambda s: {"score": s}  # noqa: E731
    by = {("full", None): row(0.5), ("knorm", 0.5): row(0.25), ("knorm (kvpress)", 0.5): row(0.25),
          ("snapkv", 0.5): row(0.1), ("snapkv (kvpress)", 0.5): row(0.2), ("h2o", 0.5): row(0.3),
          ("mystery", 0.5): row(0.1), ("mystery (kvpress)", 0.5): row(0.3)}
    line = ruler_parity(by, [0.5], 12)[0]
    assert "equal at every ratio: knorm." in line and "h2o" not in line and "full" not in line
    assert "snapkv at ratio 0.5 (-10.0 points) (the paper's max pooling" in line  # no answers stored: no SE
    assert "mystery at ratio 0.5 (-20.0 points) (not by design: investigate)" in line
    assert "8.3 points" in line


def test_report_ruler_noise_pairs_the_answers():
    """RULER rows with their answers: a standing line and the same-method line carry the paired SE over
    answers; a kvpress pair that differs within 2 SE is said to be within noise, one beyond is not."""
    from tinyengine.benchreport import momentkv_standing, paired_noise, ruler_parity

    row = lambda answers: {"score": sum(answers) / len(answers), "answers": answers}  # noqa: E731
    ours, theirs = row([1, 1, 1, 0, 1, 1, 1, 1]), row([1, 0, 1, 0, 1, 1, 0, 1])
    d = [0, 1, 0, 0, 0, 0, 1, 0]
    mean = sum(d) / 8
    assert math.isclose(paired_noise(ours, theirs, "score"), math.sqrt(sum((x - mean) ** 2 for x in d) / 7 / 8))
    by = {("momentkv", 0.5): ours, ("tova", 0.5): theirs}
    line = momentkv_standing(by, ["momentkv", "tova"], [0.5], "score", True, lambda v: f"{100 * v:.1f}%", "all lengths")
    assert "momentkv 87.5% against tova 62.5%, leads (by 25.0% ± 16.4% SE, 1.5 SE: within noise)." in line
    by = {("knorm", 0.5): ours, ("knorm (kvpress)", 0.5): theirs,
          ("keydiff", 0.5): row([1] * 8), ("keydiff (kvpress)", 0.5): row([0] * 8)}
    line = ruler_parity(by, [0.5], 8)[0]
    assert "Within 2 SE at every ratio (paired over the same answers): knorm." in line
    assert "keydiff at ratio 0.5 (+100.0 points ± 0.0, inf SE) (not by design: investigate)" in line
    plain = {("momentkv", 0.5): {"score": 0.5}, ("tova", 0.5): {"score": 0.4}}  # a run made before answers were stored
    assert momentkv_standing(plain, ["momentkv", "tova"], [0.5], "score", True, str, "x").endswith("leads.")


def test_report_keeps_the_default_seed_and_shows_the_others(tmp_path):
    """A newer run at another seed does not replace the default run's table; it joins "Other seeds"
    if it ran the same rows, and is left out if it did not (an ad hoc --policies run)."""
    from tinyengine.benchreport import FIDELITY_METRICS, fidelity_rows, load_results, other_seeds, section_seeds

    def run(seed, date, kl_ours, kl_theirs, policies=None):
        rows = [{"table": "fidelity", "method": "full", "source": "tinyengine", "ratio": None, "kl": 0.0, "top1": 1.0, "nll": 2.0}]
        rows += [{"table": "fidelity", "method": m, "source": src, "ratio": 0.5, "kl": kl, "top1": 0.9, "nll": 2.1}
                 for m, src, kl in (("momentkv", "tinyengine", kl_ours), ("snapkv", "kvpress", kl_theirs))]
        d = {"suite": "fidelity", "size": "default", "date": date, "command": f"python bench.py quality --seed {seed}",
             "config": {"seed": seed, "policies": policies, "ratios": None, "kvpress": True}, "rows": rows}
        (tmp_path / f"fidelity-{seed}-{date}.json").write_text(json.dumps(d))

    run(0, "2026-01-01", 0.010, 0.020)
    run(1, "2026-01-02", 0.030, 0.025)
    run(2, "2026-01-03", 0.004, 0.005)
    run(1, "2026-01-04", 0.5, 0.5, policies=["momentkv"])  # ad hoc: other rows
    chosen = load_results(tmp_path)["fidelity"]
    assert chosen["config"]["seed"] == 0
    others = other_seeds(tmp_path, chosen)
    assert [d["config"]["seed"] for d in others] == [1, 2] and others[0]["date"] == "2026-01-02"
    text = section_seeds(chosen, others, fidelity_rows, FIDELITY_METRICS, "passages")
    assert "| momentkv | 0.010 / 0.030 / 4.0e-03 | 0.015 |" in text and "| snapkv (kvpress) | 0.020 / 0.025 / 5.0e-03 | 0.017 |" in text
    assert "(KL to full, pooled): ratio 0.5: momentkv 0.015 against snapkv (kvpress) 0.017, leads" in text
    assert "(KL to full, seed 0): ratio 0.5: momentkv 0.010 against snapkv (kvpress) 0.020, leads" in text
    assert "(KL to full, seed 1): ratio 0.5: momentkv 0.030 against snapkv (kvpress) 0.025, behind" in text
    assert "over every seed and ratio: KL to full in 2 of 3, top-1 agreement in 0 of 3" in text  # top-1 tied


def test_report_flags_long_generation_scores_above_full(tmp_path):
    from tinyengine.benchreport import LONGGEN_METRICS, longgen_rows, section_longgen, section_seeds

    row = lambda m, db, score, parity="total capacity": {"method": m, "decode_budget": db, "parity": parity,  # noqa: E731
                                                         "kl": 0.01, "top1": 0.99, "score": score, "kl_by_pos": None}
    d = {"command": "python bench.py quality", "date": "2026-01-01", "config": {"lg_questions": 64, "lg_tokens": 2048},
         "rows": [{**row("full", None, 0.1, None), "prompt_tokens": 100}, row("momentkv", 8, 0.1),
                  row("scope", 8, 0.125, "decode pool"), row("momentkv", 16, 0.1), row("scope", 16, 0.1, "decode pool")]}
    text = section_longgen(d, tmp_path)
    assert "decode budget 8: momentkv 10.0% against scope 12.5%, behind" in text
    assert "Above full's own score: scope at 8; one sub-question is 1.6 points." in text
    other = dict(d, config={**d["config"], "seed": 1}, rows=[dict(r, kl=r["kl"] * 3) if r["method"] == "scope" else r
                                                              for r in d["rows"]])
    text = section_seeds(d, [other], longgen_rows, LONGGEN_METRICS, "prompts", "decode budget")
    assert "| scope | 0.010 / 0.030 | 0.010 / 0.030 | 0.020 | 0.020 |" in text
    assert "(KL, pooled): decode budget 8: momentkv 0.010 against scope 0.020, leads" in text
    assert "over every seed and decode budget: KL in 2 of 4, score in 0 of 4" in text  # seed 0's KL: tied


def test_block_means_cover_every_token_and_keep_the_mean():
    """The fidelity rows' block means (the noise estimate's input): every position counted once,
    NOISE_BLOCK positions per block where the length allows, one block per passage where it is shorter."""
    sys.path.insert(0, str(ROOT))
    from bench import NOISE_BLOCK, block_means

    x = torch.rand(2, 8 * NOISE_BLOCK, dtype=torch.float64)
    blocks = block_means(x)
    assert len(blocks) == 16 and math.isclose(sum(blocks) / 16, x.mean().item(), rel_tol=1e-4)
    assert math.isclose(blocks[1], x[1, :NOISE_BLOCK].mean().item(), rel_tol=1e-4)  # chunk-major: chunk 0 of passage 1
    assert len(block_means(torch.rand(2, 24))) == 2 and len(block_means(torch.rand(1, 8))) == 1


def test_report_states_differences_against_their_paired_standard_error():
    """A standing line carries the difference, its batch-means standard error and whether it is within
    2 SE; the same-method line says which of our methods are within noise of kvpress's and which are not,
    with the reason; runs without block means get neither."""
    from tinyengine.benchreport import fidelity_parity, momentkv_standing, paired_noise

    row = lambda kl, blocks: {"kl": kl, "blocks": {"kl": blocks}}  # noqa: E731
    a, b = row(0.010, [0.010, 0.012, 0.008, 0.010]), row(0.011, [0.011, 0.012, 0.010, 0.011])
    d = [-0.001, 0.0, -0.002, -0.001]  # a - b per block
    sd = math.sqrt(sum((x + 0.001) ** 2 for x in d) / 3)
    assert math.isclose(paired_noise(a, b, "kl"), sd / 2)
    assert paired_noise({"kl": 0.1}, b, "kl") is None and paired_noise(a, row(0.1, [0.1]), "kl") is None
    by = {("momentkv", 0.5): a, ("snapkv (kvpress)", 0.5): b}
    line = momentkv_standing(by, ["momentkv", "snapkv (kvpress)"], [0.5], "kl", False, lambda v: f"{v:.4f}", "KL")
    assert "momentkv 0.0100 against snapkv (kvpress) 0.0110, leads (by 0.0010 ± 0.0004 SE, 2.4 SE)." in line
    by[("snapkv (kvpress)", 0.5)] = row(0.011, [0.016, 0.012, 0.006, 0.010])  # same mean, noisier difference
    assert "SE: within noise)" in momentkv_standing(by, ["momentkv", "snapkv (kvpress)"], [0.5], "kl", False, str, "KL")
    by = {("knorm", 0.5): a, ("knorm (kvpress)", 0.5): row(0.0101, [0.0103, 0.0119, 0.0083, 0.0099]),
          ("snapkv", 0.5): a, ("snapkv (kvpress)", 0.5): b, ("mystery", 0.5): b, ("mystery (kvpress)", 0.5): a}
    line = fidelity_parity(by, [0.5])[0]
    assert "within 2 SE at every ratio: knorm." in line
    assert "snapkv at ratio 0.5 (-1.0e-03 ± " in line and "(the paper's max pooling" in line
    assert "mystery at ratio 0.5 (+1.0e-03 ± " in line and "(not by design: investigate)" in line
    assert fidelity_parity({("knorm", 0.5): {"kl": 0.1}, ("knorm (kvpress)", 0.5): {"kl": 0.1}}, [0.5]) == []
    # the same kept set through two engines: KLs equal to rounding, with a paired SE as small (z = 2.4)
    by = {("keydiff", 0.5): row(0.05, [0.05, 0.05, 0.05, 0.05]),
          ("keydiff (kvpress)", 0.5): row(0.05 + 1.5e-7, [0.05 + 1e-7, 0.05 + 2e-7, 0.05 + 1e-7, 0.05 + 2e-7])}
    assert "(not by design: investigate)" in fidelity_parity(by, [0.5])[0]
    line = fidelity_parity(by, [0.5], rounding=4.6e-8)[0]
    assert "within 2 SE at every ratio: keydiff (a difference under 10x the full caches' own KL, 4.6e-07" in line
    assert "Beyond" not in line
    assert "Beyond: keydiff" in fidelity_parity(by, [0.5], rounding=1e-8)[0]  # 1.5e-7 is above 10x 1e-8


def test_other_seeds_pool_the_block_means_and_count_leads_beyond_noise():
    from tinyengine.benchreport import FIDELITY_METRICS, fidelity_rows, section_seeds

    def run(seed, ours, theirs):
        row = lambda m, src, blocks: {"table": "fidelity", "method": m, "source": src, "ratio": 0.5,  # noqa: E731
                                      "kl": sum(blocks) / 4, "top1": 0.9, "nll": 2.0,
                                      "blocks": {"kl": blocks, "top1": [0.9] * 4, "nll": [2.0] * 4}}
        return {"suite": "fidelity", "size": "default", "date": f"2026-01-0{seed + 1}", "command": "c",
                "config": {"seed": seed}, "rows": [row("momentkv", "tinyengine", ours), row("snapkv", "kvpress", theirs)]}

    seed0 = run(0, [0.010, 0.011, 0.009, 0.010], [0.020, 0.022, 0.019, 0.021])  # clearly ahead
    seed1 = run(1, [0.010, 0.030, 0.002, 0.018], [0.012, 0.022, 0.010, 0.018])  # ahead by noise
    text = section_seeds(seed0, [seed1], fidelity_rows, FIDELITY_METRICS, "passages")
    assert "KL to full in 2 of 2 (1 by more than 2 SE; behind by more than 2 SE in 0)" in text
    pooled = [line for line in text.splitlines() if "(KL to full, pooled)" in line][0]
    assert "leads (by " in pooled and " SE" in pooled  # pooled over 8 blocks
    seed1_line = text.split("(KL to full, seed 1)")[1].splitlines()[0]
    assert "momentkv 0.015 against snapkv (kvpress)" in seed1_line and "leads (by " in seed1_line
    assert "SE: within noise)" in seed1_line
