"""Benchmarks: quality of the KV policies (with kvpress side by side), speed and memory (with transformers).

    python bench.py quality [--quick]      fidelity + MomentKV ablation, RULER-style retrieval, long generation
    python bench.py speed                  prefill/decode tok/s vs transformers, bandwidth limit, compile, flat-cost curve
    python bench.py memory                 peak RSS and KV bytes vs context; chunked vs full prefill (a subprocess each)
    python bench.py attention              SDPA vs flex vs reference on this device (the engine's backend choice); decode's weight products
    python bench.py tp                     tensor parallel decode tok/s at 1, 2, 3 ranks (torchrun, gloo on CPU)
    python bench.py report                 BENCHMARKS.md and the plots, from every bench_results/*.json
    python bench.py all                    all of the above, then report

Each run writes one JSON file (command line, machine, date, versions, rows) into --out; `report`
regenerates BENCHMARKS.md from them, so no figure is ever typed by hand. Sizes: --smoke (seconds,
for the tests), --quick (minutes), default (the published tables), --large (more samples).
All tasks are generated offline and seeded (tinyengine/benchdata.py); the runners that keep the
quality suites fast and exact are in tinyengine/benchkit.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Sizes per suite. default: under 45 minutes for `quality` on 2 CPU cores (see BENCHMARKS.md for the measured time).
SIZES = {
    "smoke": dict(fid_n=1, fid_ctx=160, fid_cont=8, ratios=[0.5], ruler_lengths=[512], ruler_tasks=["niah_single"],
                  ruler_n=1, lg_questions=2, lg_tokens=16, decode_budgets=[8, 12], group_tokens=4096,
                  contexts=[256], speed_prompts=[64], speed_batches=[1], speed_new=4, budget=64, linear_rows=[1, 2]),
    "quick": dict(fid_n=2, fid_ctx=512, fid_cont=24, ratios=[0.5], ruler_lengths=[1024],
                  ruler_tasks=["niah_single", "niah_multikey"], ruler_n=1, lg_questions=4,
                  lg_tokens=96, decode_budgets=[32, 64], group_tokens=8192,
                  contexts=[512, 1024], speed_prompts=[128, 1024], speed_batches=[1, 8], speed_new=16, budget=256,
                  linear_rows=[1, 2, 8]),
    "default": dict(fid_n=2, fid_ctx=1024, fid_cont=128, ratios=[0.5, 0.75, 0.875], ruler_lengths=[1024, 2048, 4096],
                    ruler_tasks=["niah_single", "niah_multikey", "niah_multivalue", "vt"], ruler_n=1, lg_questions=64,
                    lg_tokens=2048, decode_budgets=[128, 256, 512], group_tokens=16384,
                    contexts=[1024, 2048, 4096, 8000], speed_prompts=[128, 1024, 4096], speed_batches=[1, 8],
                    speed_new=32, budget=1024, extra_rows=True, linear_rows=[1, 2, 4, 8, 16]),
    "large": dict(fid_n=8, fid_ctx=2048, fid_cont=256, ratios=[0.5, 0.75, 0.875], ruler_lengths=[1024, 2048, 4096],
                  ruler_tasks=["niah_single", "niah_multikey", "niah_multivalue", "vt"], ruler_n=8, lg_questions=96,
                  lg_tokens=3072, decode_budgets=[128, 256, 512], group_tokens=8192,
                  contexts=[1024, 2048, 4096, 8000], speed_prompts=[128, 1024, 4096], speed_batches=[1, 8],
                  speed_new=64, budget=1024, extra_rows=True, linear_rows=[1, 2, 4, 8, 16]),
}
RULER_RATIOS_DEFAULT = [0.5, 0.75]  # RULER runs fewer ratios than fidelity (its decode is the costly part)
# momentkv's default base (every prompt query votes, policies/momentkv.py section 5) is tuned for fidelity; RULER also
# runs it on SnapKV's base (the last 32 queries vote, pooled over 7), to show what MI + NC add to retrieval there.
# base=keys is its query-agnostic base (key geometry against the summary, section 5b), recent=0.05 the best of
# 0.25/0.05 on RULER samples of another seed (`bench.py quality --suites ruler --samples 2 --seed 7 --ratios 0.5,0.75
# --policies "momentkv{base=keys},momentkv{base=keys;recent=0.05},keydiff"`); fidelity shows what it costs on prose.
KEY_BASE = "momentkv{base=keys;recent=0.05}"
RULER_EXTRA = ["momentkv{recent=-1;window=32;kernel=7}", KEY_BASE]  # (the extra rows run at the default and large sizes)
# Long generation (issue 5 part C). momentum{debias=1} is the finding of that suite: with the paper's rule a
# fresh token competes with (1 - beta) times its self-attention, so the newest go first (policies/momentum.py).
DECODE_POLICIES = ["momentum", "momentum{debias=1}", "scope", "h2o", "streamingllm", "tova", "momentkv"]
# momentkv deciding once per layer (all heads' attention, as TOVA and Moment-KV; policies/momentkv.py section 5c) with
# a shorter memory: chosen on another seed's long generation (`bench.py quality --suites longgen --seed 1
# --decode-budgets 128,512 --decode-policies "tova,momentkv,momentkv{per_kv_head=0},momentkv{per_kv_head=0;beta=0.9}"`);
# fidelity shows what it costs on prose. Default and large sizes only.
LAYER_DECISION = "momentkv{per_kv_head=0;beta=0.9}"
DECODE_EXTRA = [LAYER_DECISION]
# momentkv's NC on kvpress's ObservedAttention base (every query of the default size's 1024-token context votes, each
# token's votes averaged over the queries that see it, nothing protected; with nc=0 it keeps ObservedAttention's set,
# tests/test_kvpress_equality.py): what the moments add to that press, at its parity. NC alone was chosen over MI + NC
# on ad hoc runs (not checked in) of `bench.py quality --suites fidelity --seed 1` and `--seed 2` with both rows.
OBSERVED_NC = "momentkv{prefill_only=1;window=1024;vote_mean=token;recent=0;mi=none}"
# kvpress's presses compress the prompt only and keep every generated token; unified momentkv keeps its budget in
# total. The prefill-only rows are momentkv at kvpress's parity.
FIDELITY_EXTRA = ["momentkv{prefill_only=1}", OBSERVED_NC, KEY_BASE, LAYER_DECISION]
# scope keeps a recent window of 256 generated tokens, more than small decode budgets hold: when it does not fit,
# its window is half the smallest decode budget of the run, the same at every budget so that they share one batch.
RETRY_OPTIONS = {"scope": lambda budgets: {"recent": min(budgets) // 2}}


# ----------------------------------------------------------------------------- results


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("transformers", "kvpress"):
        try:
            info[mod] = version(mod)
        except PackageNotFoundError:  # not installed: the suites that need it say so in their notes
            info[mod] = None
    return info


def save(args, suite: str, rows: list, notes: list, config: dict, started: float, job_seconds=()) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    data = {"suite": suite, "size": args.size, "command": "python bench.py " + " ".join(args.argv),
            "date": now.isoformat(timespec="seconds"), "elapsed_s": round(time.time() - started, 1),
            "checkpoint": args.checkpoint, "machine": machine(), "config": config,
            "notes": list(dict.fromkeys(notes)), **({"job_seconds": [list(j) for j in job_seconds]} if job_seconds else {}),
            "rows": rows}
    path = out / f"{suite}-{args.size}-{now.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=1, default=float))
    print(f"[{suite}] {len(rows)} rows -> {path}", file=sys.stderr)
    return path


class Progress:
    """One tqdm bar per suite, advanced by estimated cost so that its ETA means something."""

    def __init__(self, desc: str, total: float, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=round(total, 1), desc=desc, unit="u", disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")

    def doing(self, what: str):
        self.bar.set_postfix_str(what, refresh=True)

    def done(self, cost: float):
        self.bar.update(round(cost, 1))

    def close(self):
        self.bar.close()


_JOBS = None  # (function, jobs, bench, progress counter): what run_jobs' forked workers read


def _run_job(i: int):
    fn, jobs, b, counter = _JOBS
    before = len(b.notes)

    def tick(cost):
        with counter.get_lock():
            counter.value += cost

    started = time.perf_counter()
    result = fn(jobs[i], tick)
    return i, result, b.notes[before:], time.perf_counter() - started


def run_jobs(b, bar: Progress, jobs: list, fn, label, cost=None) -> list:
    """fn(job, tick) for each job, in `--workers` forked processes; results in job order. tick(cost)
    advances the progress bar; notes the jobs add come back to `b.notes`. cost(job): a relative
    estimate; the costliest start first, so that the last job to finish is a short one.

    The jobs are independent runs of one suite (a policy at its ratios or budgets, a kvpress sample).
    An eager decode step of a few rows spends much of its time in Python and small ops that keep one
    core busy, so two one-thread processes get more done on 2 cores than one with two threads (the
    quality run's times in BENCHMARKS.md are with `--workers 2`; `--workers 1` gives the same rows,
    slower). fork() shares the model, the recorded prefill and
    the reference logits with the workers, copy-on-write, and each job's numbers are what it computes
    alone (tests/test_bench.py)."""
    workers = min(b.args.workers, len(jobs))
    order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i])) if cost else list(range(len(jobs)))  # (stable)
    job_seconds = getattr(b, "job_seconds", [])
    if workers <= 1:
        results = []
        for job in jobs:
            bar.doing(label(job))
            started = time.perf_counter()
            results.append(fn(job, bar.done))
            job_seconds.append((label(job), round(time.perf_counter() - started, 1)))
        return results
    import torch

    global _JOBS
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("d", 0.0)
    _JOBS = (fn, jobs, b, counter)
    results, shown = {}, 0.0
    # An executor, not multiprocessing.Pool: when a worker dies (the out-of-memory killer), Pool
    # silently starts another and waits forever for the lost job; the executor fails the job.
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=torch.set_num_threads,
                               initargs=(max(1, torch.get_num_threads() // workers),))
    try:
        index = {pool.submit(_run_job, i): i for i in order}  # workers take jobs in submission order
        pending = set(index)
        while pending:
            running = [label(jobs[k]) for k in order if k not in results][:workers]  # the first unfinished
            bar.doing(" | ".join(running))
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    i, result, notes, seconds = future.result()
                except BrokenProcessPool:
                    raise RuntimeError(
                        f"a bench worker process died while running {' | '.join(running)} (killed by a signal: on Linux "
                        "usually the out-of-memory killer, see `dmesg`). Rerun with --workers 1 (one job in memory at a "
                        "time) or on a machine with more memory") from None
                results[i] = result
                b.notes += notes
                job_seconds.append((label(jobs[i]), round(seconds, 1)))
            now = counter.value  # read once: a worker may tick between two reads
            bar.done(now - shown)
            shown = now
    except BaseException:  # a job failed or the run was interrupted: stop the other jobs rather than wait for them
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    finally:
        _JOBS = None
        pool.shutdown(wait=True, cancel_futures=True)
    return [results[i] for i in range(len(jobs))]


# ----------------------------------------------------------------------------- shared setup


class Bench:
    """The model (ours, and transformers' on demand), tokenizer and notes shared by the suites."""

    def __init__(self, args):
        import torch

        import tinyengine
        from tinyengine.benchkit import ReplayModel
        from tinyengine.checkpoint import resolve_checkpoint

        torch.manual_seed(args.seed)
        self.args = args
        self.folder = resolve_checkpoint(args.checkpoint, progress=not args.no_progress)
        self.model, self.tokenizer = tinyengine.load(args.checkpoint, device=args.device, dtype="float32",
                                                     progress=not args.no_progress)
        self.replay = ReplayModel(self.model)
        self.notes: list[str] = []
        self.job_seconds: list[tuple[str, float]] = []  # (job, wall seconds) of the suite running (run_jobs)
        self._hf = None
        self._replay_checked: dict[str, bool] = {}

    @property
    def hf(self):
        if self._hf is None:
            from tinyengine.benchkit import load_hf

            self._hf = load_hf(self.folder).to(self.args.device)
        return self._hf

    def engine(self, plan=None):
        from tinyengine.engine import Engine

        return Engine(self.replay, plan, compile=False)

    def plan(self, spec: str, **kw):
        """make_plan for a spec, or None with a note. Spec: "name" or "a+b", optional policy options
        in braces and an optional ":nc" correction, e.g. "snapkv{window=64;kernel=5;pooling=avg}:nc"."""
        from policies import make_plan

        name, options, correction = parse_spec(spec)
        if options:
            kw = {**kw, "options": {**options, **(kw.get("options") or {})}}
        try:
            return make_plan(name, correction=correction, **kw)
        except ValueError as e:
            self.notes.append(f"{spec} skipped at {fmt_kw(kw)}: {e}")
            return None

    def replay_ok(self, key: str, plan_factory, prompt: list[int]) -> bool:
        """Whether a replayed prefill (tinyengine/benchkit.py) equals the real one for this plan,
        checked once per plan on a short prompt at default sizes (the tests check it too). On a
        mismatch the suite prefills for real and says so."""
        if self.args.size in ("smoke", "quick") or self.args.exact_prefill:
            return not self.args.exact_prefill
        if key not in self._replay_checked:
            from tinyengine.benchkit import pad, verify_replay

            tokens, lengths = pad([prompt[:160]], self.args.device)
            problem = verify_replay(lambda: self.engine(plan_factory()), self.replay, tokens, lengths)
            if problem:
                self.notes.append(f"{key}: {problem}; its prefill runs for real (slower, exact)")
            self._replay_checked[key] = problem is None
        return self._replay_checked[key]

    def as_rows(self, keys: list[str], factories: list, prompt: list[int], tape, n: int):
        """One policy at several ratios as rows of one batch (Engine.prefill's row_plans): a decode
        step reads the weights once for all of them, and each row computes what it would alone
        (tests/test_bench.py). Fresh plans from `factories`, plan-major over the `n` rows of a group;
        the recorded prefill tiled once per plan if every plan replays exactly.
        -> (engine, row_plans, tape or None)."""
        ok = all([self.replay_ok(key, factory, prompt) for key, factory in zip(keys, factories, strict=True)])
        plans = [factory() for factory in factories]  # the rows read only their counts; the engine runs the first
        return self.engine(plans[0]), [plan for plan in plans for _ in range(n)], tape.repeat(len(plans)) if ok else None

    def kvpress_presses(self) -> list[str]:
        from tinyengine.benchkit import KVPRESS_OTHERS, KVPRESS_SHARED

        if not self.args.kvpress:
            return []
        try:
            import kvpress  # noqa: F401
        except ImportError:
            self.notes.append("kvpress is not installed (pip install kvpress): its rows are missing")
            return []
        names = list(KVPRESS_SHARED) + list(KVPRESS_OTHERS)
        if self.args.presses:
            unknown = [p for p in self.args.presses if p not in names]
            if unknown:
                self.notes.append(f"unknown kvpress presses skipped: {', '.join(unknown)} (known: {', '.join(names)})")
            names = [p for p in self.args.presses if p in names]
        return names

    def prefill_policies(self, extra=()) -> list[str]:
        """Policies that compress the prompt (the ratio suites); decode-only ones are noted. `extra`
        specs follow the registered ones when --policies does not pick the list."""
        from policies import POLICIES

        names = self.args.policies or [n for n in POLICIES if n != "full"] + list(extra)
        keep = []
        for spec in names:
            parts = parse_spec(spec)[0].split("+")
            if any(p not in POLICIES for p in parts):
                self.notes.append(f"policy {spec} is not registered here (policies.POLICIES): skipped")
            elif not POLICIES[parts[0]].has_prefill:
                self.notes.append(f"{spec} only evicts generated tokens: it is in the long-generation suite, not here")
            else:
                keep.append(spec)
        return keep


def parse_spec(spec: str):
    """"name{k=v;k=v}:nc" -> ("name", {"k": "v"}, "nc"); options and correction are optional."""
    head, _, correction = spec.partition(":")
    name, _, opts = head.partition("{")
    options = dict(o.split("=", 1) for o in opts.rstrip("}").split(";") if "=" in o)
    return name, options, correction or None


def fmt_kw(kw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items() if v is not None and k != "options") or "defaults"


def chat_ids(tokenizer, text: str) -> list[int]:
    if tokenizer.has_chat_template:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)
    return tokenizer.encode(text)


# ----------------------------------------------------------------------------- quality: fidelity + ablation


def suite_fidelity(b: Bench, size: dict) -> list[dict]:
    """Teacher-forced on prose: prefill the context (the policy compresses it), feed the reference
    continuation through decode steps (the policy evicting as it goes), compare with `full`:
    KL(full || policy) per position, top-1 agreement, NLL of the reference, and each layer's
    attention-output relative error (the MomentKV ablation's measure)."""
    import torch

    from policies.base import CachePlan
    from tinyengine.benchdata import fidelity_samples
    from tinyengine.benchkit import drive, plan_window

    args = b.args
    samples = fidelity_samples(b.tokenizer, size["fid_n"], size["fid_ctx"], size["fid_cont"], seed=args.seed)
    ctx = [c for c, _ in samples]
    cont = torch.tensor([x for _, x in samples])
    ratios = args.ratios or size["ratios"]
    configs = []  # (table, method, ratio, plan factory)
    for spec in b.prefill_policies(FIDELITY_EXTRA if size.get("extra_rows") else ()):
        for r in ratios:
            configs.append(("fidelity", spec, r, plan_factory(b, spec, r, size["fid_ctx"])))
    try:
        from policies.momentkv import ABLATION
    except ImportError:
        ABLATION = {}
        b.notes.append("policies.momentkv.ABLATION not found: the MomentKV ablation is missing")
    if "ablation" in args.suites and ABLATION:
        for variant, options in ABLATION.items():
            for r in ratios:
                configs.append(("ablation", variant, r, plan_factory(b, "momentkv", r, size["fid_ctx"], options)))
    configs = [(t, m, r, f, f()) for t, m, r, f in configs]
    configs = [c for c in configs if c[4] is not None]
    presses = b.kvpress_presses()
    L = size["fid_cont"]
    bar = Progress("fidelity", (1 + len(configs)) * L + len(presses) * len(ratios) * len(samples) * 2 + len(samples) * 10,
                   not args.no_progress)

    # Per-layer attention outputs at decode steps, via forward hooks on the attention modules.
    outputs: list[list[torch.Tensor]] = []
    layers = b.model.model.layers
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: outputs[-1].append(o[:, -1].clone()) if o.shape[1] == 1 else None)
             for i, layer in enumerate(layers)]

    def run(engine, k=1, row_plans=None, tape=None, record=0):
        """Drive the samples under k plans (rows as Bench.as_rows lays them out). Per plan: the
        logits [n, V] and each layer's attention output [layers, n, hidden] per step."""
        n = len(ctx)
        logits_seq, attn_seq = [[] for _ in range(k)], [[] for _ in range(k)]

        def on_logits(t, logits):
            for j in range(k):
                logits_seq[j].append(logits[j * n:(j + 1) * n])
            if t > 0:
                step = torch.stack(outputs[-1])  # [layers, rows, hidden] of the step that made `logits`
                for j in range(k):
                    attn_seq[j].append(step[:, j * n:(j + 1) * n])
            outputs.append([])

        outputs.clear()
        outputs.append([])
        _, rec = drive(engine, ctx * k, [c.tolist() for c in cont] * k, 0, tape=tape,
                       replay=b.replay, record_window=record, on_logits=on_logits, row_plans=row_plans)
        return logits_seq, attn_seq, rec

    rows = []
    try:
        bar.doing("full (recording the prefill)")
        (full_logits,), (full_attn,), tape = run(b.engine(CachePlan()), record=plan_window([c[4] for c in configs]))
        bar.done(L)
        rows.append(fid_row(b, "fidelity", "full", "tinyengine", None, full_logits, full_logits, full_attn, full_attn, cont, 1.0))
        methods = list(dict.fromkeys((c[0], c[1]) for c in configs))
        groups = {m: [c for c in configs if c[:2] == m] for m in methods}
        for table, method in methods:  # checked once per plan, here, so that the workers inherit the answers
            for c in groups[table, method]:
                b.replay_ok(f"{table}:{method}@{c[2]}", c[3], ctx[0])

        def run_method(m, tick):  # a method's ratios as rows of one batch
            table, method = m
            group = groups[m]
            engine, row_plans, group_tape = b.as_rows([f"{table}:{method}@{c[2]}" for c in group], [c[3] for c in group],
                                                      ctx[0], tape, len(ctx))
            logits, attn, _ = run(engine, len(group), row_plans, tape=group_tape)
            tick(L * len(group))
            return [fid_row(b, table, method, "tinyengine", r, full_logits, logits[j], full_attn, attn[j], cont,
                            kept_fraction(plan, [len(c) for c in ctx])) for j, (_, _, r, _, plan) in enumerate(group)]

        label = lambda m: f"{m[1]} ratios {','.join(str(c[2]) for c in groups[m])}"  # noqa: E731
        for got in run_jobs(b, bar, methods, run_method, label):
            rows += got
    finally:
        for h in hooks:
            h.remove()
    if presses:
        rows += fidelity_kvpress(b, presses, ratios, ctx, cont, full_logits, bar)
    bar.close()
    return rows


def plan_factory(b: Bench, spec: str, ratio: float, context: int, options=None):
    """A function making a fresh plan of `spec` at `ratio` (policies hold state, so each run needs its own)."""
    return lambda: b.plan(spec, options=options, **budget_kw(b.args, ratio, context))


def budget_kw(args, ratio: float, context: int) -> dict:
    """--budgets pins absolute budgets (the ratio then only names the row); default: kvpress's ratio."""
    if args.budgets:
        return {"budget": max(1, int(round(context * (1 - ratio))))}
    return {"ratio": ratio}


def kept_fraction(plan, lengths) -> float:
    return sum(plan.prefill_keep(n) / n for n in lengths) / len(lengths)


def fid_row(b, table, method, source, ratio, ref_logits, logits, ref_attn, attn, cont, kept) -> dict:
    import torch

    from tinyengine.benchkit import compare

    kl, top1, nll = [], [], []
    for t, (r, x) in enumerate(zip(ref_logits, logits)):
        a, c, d = compare(r, x, cont[:, t])
        kl.append(a)
        top1.append(c)
        nll.append(d)
    kl, top1, nll = torch.stack(kl, 1), torch.stack(top1, 1), torch.stack(nll, 1)  # [B, L]
    row = {"table": table, "method": method, "source": source, "ratio": ratio, "kept": round(kept, 4),
           "kl": kl.mean().item(), "top1": top1.mean().item(), "nll": nll.mean().item(),
           "kl_by_pos": [round(x, 5) for x in kl.mean(0).tolist()],
           "blocks": {name: block_means(x) for name, x in (("kl", kl), ("top1", top1), ("nll", nll))}}
    if attn and ref_attn:
        a, r = torch.stack(attn), torch.stack(ref_attn)  # [steps, layers, B, hidden]
        err = (a - r).norm(dim=-1) / r.norm(dim=-1).clamp(min=1e-12)
        row["rel_err_by_layer"] = [round(x, 5) for x in err.mean(dim=(0, 2)).tolist()]
        row["rel_err"] = err.mean().item()
    return row


NOISE_BLOCK = 16  # tokens per block of the noise estimate (benchreport.paired_noise)


def block_means(x) -> list:
    """Means of runs of NOISE_BLOCK consecutive positions of each passage ([B, L] -> B * L / NOISE_BLOCK
    values): the report's standard errors come from them (batch means), since neighbouring tokens'
    errors are correlated and a per-token standard error would understate the noise."""
    n = max(1, x.shape[1] // NOISE_BLOCK)
    return [float(f"{v:.5g}") for c in x.float().tensor_split(n, dim=1) for v in c.mean(1).tolist()]


def fidelity_kvpress(b, presses, ratios, ctx, cont, our_full, bar) -> list[dict]:
    """The same samples through kvpress's presses on transformers (same weights, float32)."""
    import torch

    from tinyengine.benchkit import PressBank, hf_continue, make_press

    bank_presses = {(p, r): make_press(p, r) for p in presses for r in ratios}
    results = {key: [] for key in bank_presses}
    hf_full = []
    for i, c in enumerate(ctx):
        bar.doing(f"kvpress prefill, sample {i + 1}/{len(ctx)}")
        first, compressed, full = PressBank(b.hf, {f"{p}@{r}": press for (p, r), press in bank_presses.items()}).prefill(torch.tensor([c]))
        bar.done(10)
        forced = cont[i].tolist()[:-1]
        seq = []
        hf_continue(b.hf, full, len(c), forced, 0, first_logits=first, on_logits=lambda t, x: seq.append(x))
        hf_full.append(seq)
        for (p, r) in bank_presses:
            bar.doing(f"kvpress {p} ratio={r}")
            seq = []
            hf_continue(b.hf, compressed[f"{p}@{r}"], len(c), forced, 0, first_logits=first, on_logits=lambda t, x: seq.append(x))
            results[(p, r)].append((seq, sum(k.shape[2] for k, _ in compressed[f"{p}@{r}"]) / (len(compressed[f"{p}@{r}"]) * len(c))))
            bar.done(2)
    stack = lambda seqs: [torch.cat([s[t] for s in seqs]) for t in range(len(seqs[0]))]  # noqa: E731
    ref = stack(hf_full)
    rows = [fid_row(b, "fidelity", "full", "kvpress", None, ref, ref, None, None, cont, 1.0)]
    # transformers' full against ours: the two implementations agree (a check, not a policy).
    rows.append(fid_row(b, "check", "transformers full vs tinyengine full", "kvpress", None, our_full, ref, None, None, cont, 1.0))
    for (p, r), got in results.items():
        kept = sum(k for _, k in got) / len(got)
        rows.append(fid_row(b, "fidelity", p, "kvpress", r, ref, stack([s for s, _ in got]), None, None, cont, kept))
    return rows


# ----------------------------------------------------------------------------- quality: RULER


def suite_ruler(b: Bench, size: dict) -> list[dict]:
    """RULER-style retrieval: compress the context, then feed the question through decode steps
    (it is not seen by prefill-time scoring, kvpress's query-agnostic setting) and generate
    greedily; RULER's string_match_all score. --question-aware puts the question in the context."""
    from policies.base import CachePlan
    from tinyengine.benchdata import chat_segments, ruler_samples
    from tinyengine.benchkit import drive, plan_window

    args = b.args
    lengths = args.lengths or size["ruler_lengths"]
    samples = ruler_samples(args.tasks or size["ruler_tasks"], lengths, args.samples or size["ruler_n"], b.tokenizer, seed=args.seed)
    segs = [chat_segments(b.tokenizer, s, args.question_aware) for s in samples]
    ratios = args.ratios or ([r for r in size["ratios"] if r in RULER_RATIOS_DEFAULT] or size["ratios"])
    ctx_len = len(segs[0][0])
    plans = [(spec, r, b.plan(spec, **budget_kw(args, r, ctx_len)))
             for spec in b.prefill_policies(RULER_EXTRA if size.get("extra_rows") else ()) for r in ratios]
    plans = [p for p in plans if p[2] is not None]  # (spec, ratio, a plan, for the window it needs)
    # Groups of rows of one length, at most group_tokens prompt tokens each (the recorded prefill lives in memory).
    groups = []
    for L in lengths:
        idx = [i for i, s in enumerate(samples) if s.length == L]
        per = max(1, size["group_tokens"] // L)
        groups += [idx[j: j + per] for j in range(0, len(idx), per)]
    presses = b.kvpress_presses()
    steps = lambda g: max(len(segs[i][1]) + samples[i].max_new_tokens for i in g)  # noqa: E731
    cost = sum(sum(len(segs[i][0]) for i in g) / 200 + (1 + len(plans)) * steps(g) for g in groups)
    cost += sum(len(segs[i][0]) / 200 + len(presses) * len(ratios) * samples[i].max_new_tokens / 4 for i in range(len(samples)))
    bar = Progress("ruler", cost, not args.no_progress)
    scores = {}  # (method, source, ratio) -> {sample index: score}
    window = plan_window([p for _, _, p in plans])
    stop = b.tokenizer.stop_token_ids
    for g in groups:
        prompts = [segs[i][0] for i in g]
        forced = [segs[i][1] for i in g]
        new = [samples[i].max_new_tokens for i in g]
        bar.doing(f"full, {samples[g[0]].length} tokens x{len(g)} (recording)")
        out, tape = drive(b.engine(CachePlan()), prompts, forced, new, replay=b.replay, record_window=window, stop_ids=stop)
        score_rows(scores, ("full", "tinyengine", None), g, out, samples, b.tokenizer)
        bar.done(sum(len(p) for p in prompts) / 200 + steps(g))
        specs = list(dict.fromkeys(spec for spec, _, _ in plans))
        ratios_of = {spec: [r for other, r, _ in plans if other == spec] for spec in specs}
        factories = {spec: [plan_factory(b, spec, r, len(prompts[0])) for r in ratios_of[spec]] for spec in specs}
        for spec in specs:  # checked once per plan, here, so that the workers inherit the answers
            for r, factory in zip(ratios_of[spec], factories[spec]):
                b.replay_ok(f"{spec}@{r}", factory, prompts[0])

        def run(spec, tick):  # a policy's ratios as rows of one batch
            rs = ratios_of[spec]
            engine, row_plans, rows_tape = b.as_rows([f"{spec}@{r}" for r in rs], factories[spec], prompts[0], tape, len(g))
            out, _ = drive(engine, prompts * len(rs), forced * len(rs), new * len(rs), row_plans=row_plans,
                           tape=rows_tape, replay=b.replay, stop_ids=stop)
            tick(len(rs) * steps(g))
            return out

        label = lambda spec: f"{spec} ratios {','.join(map(str, ratios_of[spec]))}, {samples[g[0]].length} tokens x{len(g)}"  # noqa: E731
        for spec, out in zip(specs, run_jobs(b, bar, specs, run, label)):
            for j, r in enumerate(ratios_of[spec]):
                score_rows(scores, (spec, "tinyengine", r), g, out[j * len(g):(j + 1) * len(g)], samples, b.tokenizer)
        del tape
    if presses:
        ruler_kvpress(b, presses, ratios, samples, segs, scores, bar)
        if "pyramidkv" in presses:
            b.notes.append("kvpress pyramidkv: its per-layer cache lengths make transformers' multi-token question forward fail "
                           "(kvpress 0.5.5's pipeline raises); the question is fed one token at a time instead (same computation)")
    bar.close()
    rows = []
    for (method, source, r), got in scores.items():
        row = {"method": method, "source": source, "ratio": r, "score": mean_of(got.values()),
               "by_length": {str(L): mean_of(v for i, v in got.items() if samples[i].length == L) for L in lengths},
               "by_task": {t: mean_of(v for i, v in got.items() if samples[i].task == t) for t in dict.fromkeys(s.task for s in samples)},
               "n": len(got), "answers": [round(got[i], 4) for i in sorted(got)]}  # per sample, for paired noise
        rows.append(row)
    return rows


def mean_of(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def score_rows(scores, key, g, out, samples, tokenizer):
    from tinyengine.benchdata import ruler_score

    got = scores.setdefault(key, {})
    for i, toks in zip(g, out):
        got[i] = ruler_score(tokenizer.decode(toks), samples[i].references)


def ruler_kvpress(b, presses, ratios, samples, segs, scores, bar):
    import torch

    from tinyengine.benchkit import PressBank, hf_continue, make_press, stack_caches

    stop = b.tokenizer.stop_token_ids
    b.hf  # loaded once, before the workers fork

    def run(i, tick):
        s = samples[i]
        ctx, q = segs[i]
        bank = {f"{p}@{r}": make_press(p, r) for p in presses for r in ratios}
        first, compressed, full = PressBank(b.hf, bank).prefill(torch.tensor([ctx]))
        tick(len(ctx) / 200)
        got = []
        # The caches of one sample continue as one batch (kvpress's pipeline would run them one by one).
        for names, layers in stack_caches({"full": full, **compressed}):
            got += zip(names, hf_continue(b.hf, layers, len(ctx), q, s.max_new_tokens, stop_ids=stop, first_logits=first))
        tick(len(bank) * s.max_new_tokens / 4)
        return got

    label = lambda i: f"kvpress, {samples[i].task} {samples[i].length} tokens"  # noqa: E731
    for i, got in enumerate(run_jobs(b, bar, list(range(len(samples))), run, label)):
        for name, out in got:
            p, _, r = name.partition("@")
            score_rows(scores, (p, "kvpress", float(r) if r else None), [i], [out], samples, b.tokenizer)


# ----------------------------------------------------------------------------- quality: long generation


def suite_longgen(b: Bench, size: dict) -> list[dict]:
    """LongGenBench-style: one prompt, many numbered sub-questions, one long greedy output (stop
    tokens banned so every run writes the same length). Per decode-time policy and decode
    budget: the sub-question score of its own output, and KL/top-1 to `full` along full's
    trajectory (teacher-forced). Decode-only and separate-pool policies run with the prompt
    kept and the budget on the generated tokens; unified ones (h2o, streamingllm, tova, momentkv) at the
    same total capacity, prompt + decode budget (parity as in the Moment-KV paper)."""
    import torch

    from policies import POLICIES
    from policies.base import CachePlan
    from tinyengine.benchdata import longgen_sample, longgen_score
    from tinyengine.benchkit import compare, drive, plan_window

    args = b.args
    sample = longgen_sample(args.questions or size["lg_questions"], seed=args.seed)
    prompt = chat_ids(b.tokenizer, sample.prompt)
    n = args.gen_tokens or size["lg_tokens"]
    budgets = args.decode_budgets or size["decode_budgets"]
    wanted = args.decode_policies or DECODE_POLICIES + (DECODE_EXTRA if size.get("extra_rows") else [])
    names = [p for p in wanted if parse_spec(p)[0] in POLICIES]
    missing = [p for p in wanted if parse_spec(p)[0] not in POLICIES]
    if missing:
        b.notes.append(f"decode-time policies not registered here, skipped: {', '.join(missing)}")
    ban = b.tokenizer.stop_token_ids
    bar = Progress("longgen", n * (1 + len(names)), not args.no_progress)
    bar.doing("full (recording the prefill)")
    full_logits = []
    made = {name: [decode_plan(b, name, len(prompt), db, budgets) for db in budgets] for name in names}  # (plan, parity)
    window = plan_window([p for ps in made.values() for p, _ in ps])
    (full_out,), tape = drive(b.engine(CachePlan()), [prompt], None, n, ban_ids=ban, replay=b.replay, record_window=window,
                              on_logits=lambda t, x: full_logits.append(x[0].clone()))
    bar.done(n)
    full_logits = torch.stack(full_logits)  # [n, V]
    text = b.tokenizer.decode(full_out)
    rows = [{"method": "full", "decode_budget": None, "parity": None, "score": mean_of(longgen_score(text, sample.references)),
             "per_question": longgen_score(text, sample.references), "kl": 0.0, "top1": 1.0, "prompt_tokens": len(prompt),
             "generated": len(full_out), "sample_output": text[:600]}]
    skipped = [name for name in names if any(p is None for p, _ in made[name])]  # noted by decode_plan
    bar.done(n * len(skipped))
    names = [name for name in names if name not in skipped]
    ok = {name: b.replay_ok(f"longgen:{name}", lambda name=name: decode_plan(b, name, len(prompt), budgets[-1], budgets)[0], prompt)
          for name in names}
    k = len(budgets)

    def run(name, tick):
        """One batch: each budget generating freely, then each budget teacher-forced along full's output."""
        plans, parity = [p for p, _ in made[name]], made[name][0][1]
        kl, top1 = [[] for _ in budgets], [[] for _ in budgets]

        def on_logits(t, logits):
            a, c, _ = compare(full_logits[t].expand(k, -1), logits[k:])
            for j in range(k):
                kl[j].append(a[j].item())
                top1[j].append(c[j].item())
            tick(1)

        engine = b.engine(max(plans, key=lambda p: p.pool_budget(len(prompt))))
        out, _ = drive(engine, [prompt] * (2 * k), [[]] * k + [full_out] * k, [n] * k + [0] * k, ban_ids=ban,
                       on_logits=on_logits, row_plans=plans * 2, tape=tape.repeat(2 * k) if ok[name] else None, replay=b.replay)
        rows = []
        for j, db in enumerate(budgets):
            t = b.tokenizer.decode(out[j])
            per_q = longgen_score(t, sample.references)
            rows.append({"method": name, "decode_budget": db, "parity": parity, "score": mean_of(per_q), "per_question": per_q,
                         "kl": mean_of(kl[j]), "top1": mean_of(top1[j]), "kl_by_pos": bucket(kl[j], 16),
                         "sample_output": t[:600]})
        return rows

    for got in run_jobs(b, bar, names, run, lambda name: f"{name} at decode budgets {','.join(map(str, budgets))}",
                        cost=longgen_cost):
        rows += got
    bar.close()
    return rows


def longgen_cost(spec: str) -> int:
    """A long-generation job's relative cost, for run_jobs' order: a decode-pool policy's rows share
    the frozen prompt (read once per step for every row: Engine._shared_slots), a unified policy's
    read their own caches, and momentkv's also compute its score over them (the fused kernel's score pass)."""
    from policies import POLICIES

    name = parse_spec(spec)[0]
    cls = POLICIES[name]
    unified = cls.has_prefill and cls.has_decode and not getattr(cls, "separate_pools", False)
    return int(unified) + int(name == "momentkv")


def decode_plan(b: Bench, spec: str, prompt_len: int, db: int, budgets: list[int]):
    """The plan that holds `db` generated tokens: a decode pool for decode-only / separate-pool
    policies, total capacity prompt + db for unified ones. `spec` may carry options: "name{k=v}"."""
    from policies import POLICIES, make_plan

    name, options, correction = parse_spec(spec)
    cls = POLICIES[name]
    unified = cls.has_prefill and cls.has_decode and not getattr(cls, "separate_pools", False)
    kw = {"budget": prompt_len + db} if unified else {"decode_budget": db}
    parity = "total capacity" if unified else "decode pool"
    if name in RETRY_OPTIONS:
        try:
            for other in budgets:  # the default options must fit every budget of the run
                make_plan(name, **({"budget": prompt_len + other} if unified else {"decode_budget": other}), options=options)
        except ValueError:
            retry = RETRY_OPTIONS[name](budgets)
            b.notes.append(f"{spec} runs with {', '.join(f'{k}={v}' for k, v in retry.items())} "
                           f"(its default does not fit decode budget {min(budgets)})")
            options = {**options, **retry}
    try:
        return make_plan(name, **kw, options=options, correction=correction), parity
    except ValueError as e:
        b.notes.append(f"{spec} skipped at decode budget {db}: {e}")
        return None, None


def bucket(xs: list[float], k: int) -> list[float]:
    """Means of `xs` over k equal spans (for the KL-along-generation plot)."""
    if not xs:
        return []
    k = min(k, len(xs))
    edges = [round(i * len(xs) / k) for i in range(k + 1)]
    return [round(mean_of(xs[edges[i]:edges[i + 1]]), 5) for i in range(k)]


def quality(args) -> list[Path]:
    size = SIZES[args.size]
    b = Bench(args)
    if args.device != "cpu":
        args.workers = 1  # a CUDA context does not survive fork()
    elif args.pack:
        b.model.pack_weights()  # shared with the workers; the speed suites time the default engine
    paths = []
    suites = [("fidelity", suite_fidelity), ("ruler", suite_ruler), ("longgen", suite_longgen)]
    for name, fn in suites:
        if name not in args.suites and not (name == "fidelity" and "ablation" in args.suites):
            continue
        started = time.time()
        b.notes, b.job_seconds = [], []
        rows = fn(b, size)
        config = {k: v for k, v in size.items()}
        config.update({k: getattr(args, k) for k in ("ratios", "budgets", "policies", "question_aware", "seed", "kvpress",
                                                      "workers", "pack")})
        paths.append(save(args, name, rows, b.notes, config, started, b.job_seconds))
    return paths


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["quality", "speed", "memory", "attention", "tp", "report", "all", "_probe"])
    p.add_argument("--checkpoint", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_const", dest="size", const="smoke", help="seconds (tests)")
    size.add_argument("--quick", action="store_const", dest="size", const="quick", help="minutes")
    size.add_argument("--large", action="store_const", dest="size", const="large", help="more samples than the default")
    p.add_argument("--suites", type=_list(str), default=["fidelity", "ablation", "ruler", "longgen"],
                   help="quality suites: fidelity, ablation, ruler, longgen")
    p.add_argument("--policies", type=_list(str),
                   help="policy specs: name, a+b, name{key=value;...} (options), name:nc (NC correction); default: every registered one")
    p.add_argument("--decode-policies", type=_list(str), help=f"long generation; default {','.join(DECODE_POLICIES)}")
    p.add_argument("--ratios", type=_list(float), help="compression ratios (fraction of the prompt evicted)")
    p.add_argument("--budgets", action="store_true", help="pin absolute budgets (context x (1 - ratio)) instead of ratios")
    p.add_argument("--decode-budgets", type=_list(int))
    p.add_argument("--lengths", type=_list(int), help="RULER prompt lengths in tokens")
    p.add_argument("--tasks", type=_list(str), help="RULER tasks: niah_single, niah_multikey, niah_multivalue, vt")
    p.add_argument("--samples", type=int, help="RULER samples per task and length")
    p.add_argument("--questions", type=int, help="long generation: sub-questions")
    p.add_argument("--gen-tokens", type=int, help="long generation: tokens generated")
    p.add_argument("--question-aware", action="store_true", help="RULER: the question is part of the compressed context")
    p.add_argument("--kvpress", action=argparse.BooleanOptionalAction, default=True, help="run kvpress side by side")
    p.add_argument("--presses", type=_list(str), help="kvpress presses (default: the shared ones and its strongest others)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="speed: include compiled decode")
    p.add_argument("--compile-flat", action="store_true",
                   help="speed: decode-vs-context curve in both modes (default: the engine's default mode on the device)")
    p.add_argument("--parts", type=_list(str), help="speed: table,startup,flat (default: all three; flat is saved as suite flatcost)")
    p.add_argument("--ranks", type=_list(int), help="tp: numbers of ranks (default 1,2,3)")
    p.add_argument("--exact-prefill", action="store_true",
                   help="prefill every policy for real instead of replaying the recorded full prefill (slower; same numbers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--workers", type=int, default=2 if (os.cpu_count() or 1) >= 2 and sys.platform == "linux" else 1,
                   help="quality: forked processes sharing the threads, one job each (default 2 on Linux with 2+ cores; 1 on a GPU)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="quality on CPU: oneDNN-packed weights for batched decode (Transformer.pack_weights; 2x weight memory)")
    p.add_argument("--out", default=str(ROOT / "bench_results"))
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # _probe: JSON spec of one memory measurement
    args = p.parse_args(argv)
    if args.workers < 1 or (args.workers > 1 and "fork" not in multiprocessing.get_all_start_methods()):
        p.error(f"--workers {args.workers}: give 1, or more where the platform has fork()")
    args.size = args.size or "default"
    args.argv = argv
    return args


def _list(kind):
    def parse(text):  # commas inside {...} belong to policy options
        import re

        return [kind(x) for x in re.split(r",(?![^{]*\})", text) if x.strip()]
    return parse


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "_probe":
        from tinyengine.benchspeed import probe

        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    if args.command in ("quality", "all"):
        quality(args)
    if args.command in ("speed", "all"):
        from tinyengine.benchspeed import speed

        speed(args, SIZES[args.size], save)
    if args.command in ("memory", "all"):
        from tinyengine.benchspeed import memory

        memory(args, SIZES[args.size], save)
    if args.command in ("attention", "all"):
        from tinyengine.benchspeed import attention_suite

        attention_suite(args, SIZES[args.size], save)
    if args.command in ("tp", "all"):
        from tinyengine.benchspeed import tp_suite

        tp_suite(args, SIZES[args.size], save)
    if args.command in ("report", "all"):
        from tinyengine.benchreport import report

        report(Path(args.out), Path(args.markdown))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
