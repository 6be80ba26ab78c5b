"""bench.py's speed, memory and attention suites (measurements; no quality scoring here).

speed      prefill and decode tok/s at several prompt lengths and batch sizes, eager and compiled,
           against transformers' `generate` on the same weights in the same run; the bandwidth
           limit (weight bytes read per token over the bandwidth of a large tensor copy) and our
           fraction of it; cold compile time and warm start-to-first-token (subprocesses); decode
           tok/s against context length for full and each policy at a fixed budget (the flat-cost
           curve), each policy's overhead against full holding the same number of tokens, and
           transformers / kvpress at the same contexts.
memory     peak RSS (ru_maxrss of a fresh subprocess per measurement) and KV bytes against context
           length, chunked prefill against full prefill, transformers and kvpress alongside.
attention  reference vs SDPA vs flex for prefill and decode shapes of the model on this device:
           the measurement behind tinyengine.engine.default_backends.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu"):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def bandwidth(device="cpu", mib: int = 512, repeats: int = 5) -> dict:
    """Memory bandwidth from a large tensor copy (bytes read + written per second, best of `repeats`)
    and from a read-only reduction."""
    n = mib * 2**20 // 4
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    copy = min(timed(lambda: y.copy_(x), device)[0] for _ in range(repeats))
    read = min(timed(lambda: x.sum(), device)[0] for _ in range(repeats))
    return {"copy_gbs": 2 * x.numel() * 4 / copy / 1e9, "read_gbs": x.numel() * 4 / read / 1e9, "mib": mib}


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads (tied embeddings once: the lm_head reads all of it)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prose_prompts(tokenizer, length: int, batch: int) -> list[list[int]]:
    from tinyengine.benchdata import prose_tokens

    ids = prose_tokens(tokenizer)
    need = length * batch
    ids = (ids * (need // len(ids) + 1))[:need]
    return [ids[i * length:(i + 1) * length] for i in range(batch)]


# ----------------------------------------------------------------------------- speed


def ours_speed(model, prompts, new: int, compiled: bool, plan=None) -> dict:
    """Prefill tok/s and decode tok/s (after two warm-up steps) of our engine."""
    from policies.base import CachePlan
    from tinyengine.benchkit import capacities, pad
    from tinyengine.engine import Engine

    engine = Engine(model, plan or CachePlan(), compile=compiled)
    tokens, lengths = pad(prompts, engine.device)
    engine.setup(len(prompts), capacities(engine, prompts, new + 4))
    with torch.inference_mode():
        t_prefill, logits = timed(lambda: engine.prefill(tokens, lengths), engine.device)
        tok = logits.argmax(-1)[:, None]
        pos = lengths[:, None].clone()
        t_first, _ = timed(lambda: engine.decode_step(tok, pos), engine.device)  # compiles when compiled
        engine.decode_step(tok, pos + 1)
        t_decode, _ = timed(lambda: [engine.decode_step(tok, pos + 2 + i) for i in range(new)], engine.device)
    B = len(prompts)
    return {"prefill_tok_s": B * tokens.shape[1] / t_prefill, "decode_tok_s": B * new / t_decode,
            "decode_step_ms": 1000 * t_decode / new, "first_step_s": t_first, "kv_bytes": engine.kv_bytes(),
            "state_bytes": engine.state_bytes()}


class _Stamps:
    """A generate() streamer that only records when each step's tokens arrive (the prompt first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_speed(hf, prompts, new: int) -> dict:
    """transformers' generate, timed from inside its loop: prefill = start to the first new token,
    decode = the `new` steps after it (as ours: the first step is not counted)."""
    ids = torch.tensor(prompts, device=hf.device)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        hf.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        stamps = _Stamps()
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=new + 2, min_new_tokens=new + 2, streamer=stamps, **kw)
    first, steps = stamps.times[1], stamps.times[2:]  # times[0]: the prompt, put before prefill
    B = len(prompts)
    t_decode = steps[-1] - steps[0]
    return {"prefill_tok_s": B * ids.shape[1] / (first - t0), "decode_tok_s": B * (len(steps) - 1) / t_decode,
            "decode_step_ms": 1000 * t_decode / (len(steps) - 1)}


def speed(args, size: dict, save):
    import bench

    started = time.time()
    b = bench.Bench(args)
    notes, rows = [], []
    bw = bandwidth(args.device)
    wbytes = weight_bytes(b.model)
    limit = bw["copy_gbs"] * 1e9 / wbytes
    rows.append({"table": "bandwidth", **bw, "weight_bytes": wbytes, "limit_tok_s": limit})
    modes = ["eager"] + (["compiled"] if args.compile else [])
    configs = [(P, B) for P in size["speed_prompts"] for B in size["speed_batches"]]
    hf = None
    try:  # transformers' generate is the reference, always in the same run
        hf = b.hf
    except Exception as e:  # transformers missing: say so
        notes.append(f"transformers unavailable, its rows are missing: {e}")
    contexts = sorted(set(size["contexts"]) | {size["budget"]})
    parts = args.parts or ["table", "startup", "flat"]
    if "table" not in parts:
        configs = []
    bar = bench.Progress("speed", len(configs) * (len(modes) + 1) + 4 + len(contexts) * 3, not args.no_progress)
    new = size["speed_new"]
    for P, B in configs:
        prompts = prose_prompts(b.tokenizer, P, B)
        for mode in modes:
            bar.doing(f"tinyengine {mode}, prompt {P}, batch {B}")
            r = ours_speed(b.model, prompts, new, mode == "compiled")
            rows.append({"table": "speed", "engine": "tinyengine", "mode": mode, "prompt": P, "batch": B, **r,
                         "bandwidth_fraction": r["decode_tok_s"] / B / limit if B == 1 else None})
            bar.done(1)
        if hf is not None:
            bar.doing(f"transformers generate, prompt {P}, batch {B}")
            r = hf_speed(hf, prompts, new)
            rows.append({"table": "speed", "engine": "transformers", "mode": "eager", "prompt": P, "batch": B, **r,
                         "bandwidth_fraction": r["decode_tok_s"] / B / limit if B == 1 else None})
        bar.done(1)
    if "startup" in parts:
        bar.doing("cold compile (fresh inductor cache, subprocess)")
        rows += startup_rows(args, notes)
    bar.done(4)
    config = {k: size[k] for k in ("speed_prompts", "speed_batches", "speed_new", "contexts", "budget")}
    if "table" in parts or "startup" in parts:
        save(args, "speed", rows, notes + b.notes, config, started)
    if "flat" in parts:  # its own result file (suite "flatcost"), so the parts can be rerun apart
        started, notes = time.time(), []
        rows = flat_cost_rows(b, args, size, bar, notes)
        save(args, "flatcost", rows, notes + b.notes, config, started)
    bar.close()


def startup_rows(args, notes) -> list[dict]:
    """Cold and warm compile of the decode step, and start-to-first-token of generate.py (subprocesses)."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            r = run_probe({"kind": "compile", "checkpoint": args.checkpoint, "device": args.device}, env)
            if "error" in r:
                notes.append(f"compile probe failed: {r['error']}")
                break
            rows.append({"table": "startup", "what": f"{label} compile (first compiled decode step)", "seconds": r["first_step_s"]})
        for compiled in (False, True):
            cmd = [sys.executable, str(ROOT / "generate.py"), "--checkpoint", args.checkpoint, "--device", args.device,
                   "--max-new-tokens", "8", "--prompt", "The capital of France is", "--compile" if compiled else "--no-compile"]
            first, total = None, None
            for _ in range(2):  # the first run warms the OS file cache (and the inductor cache)
                first, total = time_to_first_output(cmd, env)
            label = "compiled" if compiled else "eager"
            rows.append({"table": "startup", "what": f"warm start to first token, generate.py ({label})", "seconds": first})
            rows.append({"table": "startup", "what": f"warm start to 8 tokens, generate.py ({label})", "seconds": total})
    return rows


def time_to_first_output(cmd, env) -> tuple[float, float]:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    first = None
    while True:
        ch = proc.stdout.read(1)
        if not ch:
            break
        if first is None and ch.strip():
            first = time.perf_counter() - t
    proc.wait()
    return first, time.perf_counter() - t


PAIRED = 10  # a policy and full holding the same tokens: PAIRED * half `new` steps each, alternating step by step
# (the earlier pairing, the fastest of 10 rounds of 16 steps, read momentkv 0.958x and 1.016x in two runs of
# `bench.py speed --parts flat` on 2026-11-30: one slow stretch moved a whole round; a median of single steps does not)


def flat_cost_rows(b, args, size, bar, notes) -> list[dict]:
    """Decode tok/s against context length: full holding the whole context, each policy at a fixed
    budget. The prompt is prefilled once per context (recorded) and replayed into each policy's
    prefill (tinyengine/benchkit.py), so only decode is timed. In the engine's default mode on the
    device (eager on CPU, compiled on CUDA); both with --compile-flat (one compile per plan).
    Each policy's overhead is its rate over full holding the same `budget` tokens, the two timed
    in alternation (`PAIRED` rounds, the fastest of each): the machine drifts by more than the
    5% target over a run, and even between two runs timed one after the other."""
    from policies import POLICIES
    from policies.base import CachePlan
    from tinyengine.benchkit import PressBank, drive, hf_continue, make_press, plan_window
    from tinyengine.engine import Engine

    budget, new = size["budget"], max(8, size["speed_new"])
    contexts = sorted(set(size["contexts"]) | {budget})
    specs = []
    from bench import parse_spec

    for name in (args.policies or [n for n in POLICIES if n != "full"]):
        parts = parse_spec(name)[0].split("+")
        if any(p not in POLICIES for p in parts):
            notes.append(f"flat-cost curve: {name} is not registered, skipped")
            continue
        first = POLICIES[parts[0]]
        if first.has_prefill:
            specs.append((name, {"budget": budget}))
        else:  # decode-only: the prompt would be kept whole; compose it with snapkv to hold `budget` entries
            specs.append((f"snapkv+{name}", {"budget": budget, "decode_budget": 64}))
    plans = {spec: b.plan(spec, **kw) for spec, kw in specs}
    plans = {k: v for k, v in plans.items() if v is not None}
    # The engine's default mode on this device (eager on CPU, compiled on CUDA): compiling each of a
    # dozen plans on 2 CPU cores would take ~20 minutes; --compile-flat adds the other mode.
    default = "compiled" if torch.device(args.device).type == "cuda" else "eager"
    modes = ["eager", "compiled"] if args.compile_flat else [default]
    if "compiled" in modes:  # every plan and every context of full is an engine of its own, so a graph of its own:
        # those recompiles are by design, and more than dynamo's default limit of 8 per code object
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 2 * (len(plans) + len(contexts)) + 8)
    rows = []
    compiled_engines = {}
    reference = None  # (prompt, tape) of the `budget`-token context: full holding what each policy holds
    for C in contexts:
        if C + new + 8 > b.model.args.max_position_embeddings:
            notes.append(f"context {C} + {new} tokens exceeds the model's context; skipped")
            continue
        prompt = prose_prompts(b.tokenizer, C, 1)
        bar.doing(f"flat-cost: full, context {C} (recording)")
        full = Engine(b.replay, CachePlan())
        _, tape = drive(full, prompt, None, 1, replay=b.replay, record_window=plan_window(plans.values()))
        for mode in modes:
            rows.append({"table": "context", "engine": "tinyengine", "method": "full", "mode": mode, "context": C,
                         "budget": None, **decode_rate(b, CachePlan(), prompt, tape, new, mode == "compiled", {})})
        if C == budget:
            reference = (prompt, tape)
        for spec, plan in plans.items():
            if C <= budget and spec != "full":
                continue  # nothing to evict
            for mode in modes:
                bar.doing(f"flat-cost: {spec} {mode}, context {C}")
                compiled = mode == "compiled"
                if reference is None:
                    r = decode_rate(b, plan, prompt, tape, new, compiled, compiled_engines, key=spec)
                else:  # the policy's own overhead: full holding the same tokens, timed in alternation with it
                    steps = max(4, new // 2)
                    chunk, info = ready_decode(b, plan, prompt, tape, steps, compiled, compiled_engines, spec, PAIRED)
                    ref_chunk, _ = ready_decode(b, CachePlan(), *reference, steps, compiled, compiled_engines,
                                                "full holding the budget", PAIRED)
                    r, ref = paired_decode_rates(chunk, ref_chunk, PAIRED * steps)
                    r.update(info, full_same_tokens_tok_s=ref["decode_tok_s"], vs_full_same_tokens=r["decode_tok_s"] / ref["decode_tok_s"],
                             paired_median_steps=PAIRED * steps)
                rows.append({"table": "context", "engine": "tinyengine", "method": spec, "mode": mode, "context": C,
                             "budget": budget, **r})
        tape = None  # (the reference holds its own)
        bar.done(1)
        if args.kvpress:
            bar.doing(f"flat-cost: transformers and kvpress, context {C}")
            try:
                ratio = max(0.0, 1 - budget / C)
                bank = {"snapkv": make_press("snapkv", ratio)} if ratio > 0 else {}
                first, compressed, full_layers = PressBank(b.hf, bank).prefill(torch.tensor(prompt))
                for method, layers in [("full", full_layers)] + [(k, v) for k, v in compressed.items()]:
                    t0 = time.perf_counter()
                    hf_continue(b.hf, layers, C, [], new + 1, first_logits=first)
                    dt = time.perf_counter() - t0
                    rows.append({"table": "context", "engine": "transformers" if method == "full" else "kvpress",
                                 "method": method, "mode": "eager", "context": C, "budget": budget if method != "full" else None,
                                 "decode_tok_s": new / dt, "decode_step_ms": 1000 * dt / new})
            except ImportError as e:
                notes.append(f"kvpress/transformers unavailable: {e}")
        bar.done(2)
    return rows


def ready_decode(b, plan, prompt, tape, new, compiled, engines, key=None, chunks: int = 3):
    """Prefill (replayed) and two warm-up steps; returns (chunk, info): chunk() times the next
    `new` decode steps (at most `chunks` calls), info the engine's first step and bytes."""
    from tinyengine.benchkit import capacities, pad
    from tinyengine.engine import Engine

    engine = engines.get(key) if compiled and key else None
    if engine is None:
        engine = Engine(b.replay, plan, compile=compiled)
        if compiled and key:
            engines[key] = engine
    tokens, lengths = pad(prompt, engine.device)
    engine.setup(1, capacities(engine, prompt, chunks * new + 4))
    with torch.inference_mode():
        with b.replay.replaying(tape):
            logits = engine.prefill(tokens, lengths)
        tok = logits.argmax(-1)[:, None]
        pos = lengths[:, None].clone()
        t_first, _ = timed(lambda: engine.decode_step(tok, pos))
        engine.decode_step(tok, pos + 1)
    taken = 0

    @torch.inference_mode()
    def chunk(steps: int = new) -> float:
        """Time the next `steps` decode steps (at most `chunks` * `new` in all)."""
        nonlocal taken
        start, taken = pos + 2 + taken, taken + steps
        return timed(lambda: [engine.decode_step(tok, start + i) for i in range(steps)])[0]

    return chunk, {"kv_bytes": engine.kv_bytes(), "state_bytes": engine.state_bytes(), "first_step_s": t_first}


def rate(new: int, dt: float) -> dict:
    return {"decode_tok_s": new / dt, "decode_step_ms": 1000 * dt / new}


def decode_rate(b, plan, prompt, tape, new, compiled, engines, key=None, repeats: int = 3) -> dict:
    """Time `new` decode steps after a replayed prefill, `repeats` times in a row: the fastest
    run counts (this machine's noise only ever adds time)."""
    chunk, info = ready_decode(b, plan, prompt, tape, new, compiled, engines, key, repeats)
    return {**rate(new, min(chunk() for _ in range(repeats))), **info}


def paired_decode_rates(first, second, steps: int) -> tuple[dict, dict]:
    """Two ready decodes (ready_decode's chunks) timed in alternation step by step, `steps` each,
    the median step of each: a ratio of the two is not skewed by the machine drifting between
    them, nor by one slow stretch."""
    times = [(first(1), second(1)) for _ in range(steps)]
    return rate(1, statistics.median(a for a, _ in times)), rate(1, statistics.median(b for _, b in times))


# ----------------------------------------------------------------------------- memory (subprocesses)


def run_probe(spec: dict, env=None, timeout: int = 1800) -> dict:
    cmd = [sys.executable, str(ROOT / "bench.py"), "_probe", "--probe", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or os.environ.copy(), cwd=ROOT, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _status(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS: now, VmHWM: peak since start or last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak measured excludes model loading."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe(spec: dict) -> dict:
    """One measurement in this (fresh) process; printed as JSON by `bench.py _probe`.

    peak_rss: ru_maxrss of the whole process (loading included); run_peak: the peak RSS while
    prefilling and decoding (VmHWM reset after loading); base_rss: RSS after loading.
    """
    import tinyengine
    from policies import make_plan
    from policies.base import CachePlan
    from tinyengine.checkpoint import resolve_checkpoint
    from tinyengine.engine import Engine
    from tinyengine.tokenizer import Tokenizer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    folder = resolve_checkpoint(spec["checkpoint"], progress=False)
    tokenizer = Tokenizer.from_folder(folder)
    if spec["kind"] == "compile":
        model, _ = tinyengine.load(spec["checkpoint"], device=spec.get("device", "cpu"), progress=False)
        r = ours_speed(model, prose_prompts(tokenizer, 32, 1), 2, compiled=True)
        return {"first_step_s": r["first_step_s"], "decode_step_ms": r["decode_step_ms"]}
    prompt = prose_prompts(tokenizer, spec["prompt"], 1)
    new = spec.get("new", 8)
    kv = state = None
    torch.set_grad_enabled(False)
    if spec["engine"] == "tinyengine":
        model, _ = tinyengine.load(spec["checkpoint"], device=spec.get("device", "cpu"), progress=False)
        plan = CachePlan() if spec["policy"] == "full" else make_plan(spec["policy"], budget=spec.get("budget"))
        engine = Engine(model, plan, prefill_chunk=spec.get("chunk"))
        Engine(model).generate([prompt[0][:8]], 2)  # touch every weight (memory-mapped) before the baseline
        base, reset = _status("VmRSS"), _reset_peak()
        engine.generate(prompt, new)
        kv, state = engine.kv_bytes(), engine.state_bytes()
    else:
        from tinyengine.benchkit import hf_continue, load_hf, make_press

        hf = load_hf(folder)
        with torch.inference_mode():  # touch every weight before the baseline
            hf.generate(torch.tensor([prompt[0][:8]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        base, reset = _status("VmRSS"), _reset_peak()
        with torch.inference_mode():
            if spec.get("press"):  # kvpress's own path: the press compresses during the prefill forward
                from transformers import DynamicCache

                cache = DynamicCache(config=hf.config)
                with make_press(spec["press"], spec["ratio"])(hf):
                    out = hf(input_ids=torch.tensor(prompt), past_key_values=cache, logits_to_keep=1)
                layers = [(layer.keys, layer.values) for layer in cache.layers]
                kv = sum(2 * k.numel() * k.element_size() for k, _ in layers)  # after compression, before decoding
                hf_continue(hf, layers, len(prompt[0]), [], new, first_logits=out.logits[0, -1])
            else:
                got = hf.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=0, return_dict_in_generate=True)
                kv = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in got.past_key_values.layers)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    run_peak = _status("VmHWM") if reset else peak
    return {"peak_rss": peak, "base_rss": base, "run_peak_rss": run_peak, "run_over_base": run_peak - base,
            "kv_bytes": kv, "state_bytes": state}


def memory(args, size: dict, save):
    import bench

    started = time.time()
    budget = min(512, size["budget"])
    contexts = size["contexts"]
    policy = (args.policies or ["snapkv"])[0]
    specs = []
    for C in contexts:
        specs.append(("context", {"engine": "tinyengine", "policy": "full", "prompt": C}))
        specs.append(("context", {"engine": "tinyengine", "policy": policy, "budget": budget, "prompt": C, "chunk": budget}))
        specs.append(("context", {"engine": "transformers", "prompt": C}))
        if args.kvpress and C > budget:
            specs.append(("context", {"engine": "kvpress", "press": "snapkv", "ratio": 1 - budget / C, "prompt": C}))
    big = max(contexts)
    for prompt in sorted({min(4096, big), big}):  # issue 4 asks for a 4K prompt at budget 512
        for chunk in (None, budget):
            specs.append(("chunked", {"engine": "tinyengine", "policy": policy, "budget": budget, "prompt": prompt, "chunk": chunk}))
    bar = bench.Progress("memory", len(specs), not args.no_progress)
    rows, notes = [], []
    for table, spec in specs:
        spec = {**spec, "checkpoint": args.checkpoint, "device": args.device}
        bar.doing(f"{spec['engine']} {spec.get('policy') or spec.get('press') or 'full'} prompt {spec['prompt']}"
                  + (f" chunk {spec['chunk']}" if spec.get("chunk") else ""))
        r = run_probe({**spec, "kind": "memory"})
        if "error" in r:
            notes.append(f"memory probe {spec} failed: {r['error']}")
        else:
            rows.append({"table": table, **{k: v for k, v in spec.items() if k not in ("checkpoint", "device")}, **r})
        bar.done(1)
    bar.close()
    save(args, "memory", rows, notes, {"contexts": contexts, "budget": budget, "policy": policy}, started)


# ----------------------------------------------------------------------------- tensor parallel


# A random-weight model of SmolLM2-135M's size whose 12 heads / 6 kv heads split over 1, 2 and 3 ranks
# (SmolLM2's 9 heads / 3 kv heads split over 1 or 3 only).
TP_SHAPED = {"architectures": ["LlamaForCausalLM"], "hidden_size": 768, "num_attention_heads": 12,
             "num_key_value_heads": 6, "head_dim": 64, "intermediate_size": 1536, "num_hidden_layers": 24,
             "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
             "tie_word_embeddings": True}


def random_checkpoint(folder: Path, config: dict, seed: int = 0) -> Path:
    """config.json + model.safetensors with random weights (a shape to time, no tokenizer needed)."""
    from safetensors.torch import save_file

    from models.llama import ModelArgs, Transformer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_hf_config(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tp_suite(args, size: dict, save):
    """Decode tok/s at 1, 2 and 3 ranks under torchrun (tinyengine/tp.py), each rank loading its slices.

    Models: --checkpoint at the rank counts its heads divide, and TP_SHAPED (random weights) at
    all of them. Two thread layouts: one thread per rank (ranks add cores; more ranks than cores
    oversubscribe), and the machine's cores split between the ranks (every row uses all of them)."""
    import bench
    from models.llama import ModelArgs
    from tinyengine.checkpoint import resolve_checkpoint
    from tinyengine.tp import tp_decode_tokens_per_s
    from tinyengine.weights import read_config

    started = time.time()
    ranks = args.ranks or [1, 2, 3]
    layouts = [("1 thread per rank", 1), ("cores split between ranks", None)]
    own = ModelArgs.from_hf_config(read_config(resolve_checkpoint(args.checkpoint, progress=False)))
    rows, notes = [], []
    options = {"prompt_tokens": size["speed_prompts"][0], "new_tokens": max(16, size["speed_new"]), "device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        shaped = random_checkpoint(Path(tmp) / "tp-shaped", TP_SHAPED)
        models = [(args.checkpoint, own), ("random 12 heads / 6 kv heads, 24 layers", ModelArgs.from_hf_config(TP_SHAPED))]
        runs = []
        for label, threads in layouts:
            for name, a in models:
                for n in ranks:
                    if a.num_heads % n or a.num_kv_heads % n:
                        notes.append(f"{name}: {a.num_heads} heads / {a.num_kv_heads} kv heads do not split over {n} ranks")
                    else:
                        runs.append((label, threads, name, n))
        bar = bench.Progress("tp", len(runs), not args.no_progress)
        for label, threads, name, n in runs:
            bar.doing(f"{name}: {n} rank(s), {label}")
            path = str(shaped) if name != args.checkpoint else args.checkpoint
            try:
                r = tp_decode_tokens_per_s(path, ranks=(n,), threads_per_rank=threads, **options)[n]
                rows.append({"table": "tp", "model": name, "layout": label, **r})
            except Exception as e:  # a failed launch is a finding, reported in the notes
                notes.append(f"{name}, {n} ranks ({label}) failed: {error_line(e)}")
            bar.done(1)
        bar.close()
    save(args, "tp", rows, notes, {"ranks": ranks, **options, "cpu_count": os.cpu_count()}, started)


# ----------------------------------------------------------------------------- attention backends


def error_line(e: Exception) -> str:
    """The informative line of an exception (a compiler's first "error:" line, else its first line)."""
    lines = str(e).splitlines() or [type(e).__name__]
    hit = next((l for l in lines if "error:" in l), lines[0])
    return f"{type(e).__name__}: {hit.split('error:', 1)[-1].strip()[:200]}"


def attention_suite(args, size: dict, save):
    """Prefill and decode attention per backend at the model's head shapes (random inputs)."""
    import bench
    from models.llama import ModelArgs
    from tinyengine.attention import attention, causal_attention
    from tinyengine.checkpoint import resolve_checkpoint
    from tinyengine.weights import read_config

    started = time.time()
    a = ModelArgs.from_hf_config(read_config(resolve_checkpoint(args.checkpoint, progress=False)))
    dev = torch.device(args.device)
    prefill_T = [T for T in size["speed_prompts"] if T >= 64] or [128]
    decode_S = size["contexts"]
    backends = ["reference", "sdpa", "flex", "sdpa-causal", "fused"]  # sdpa-causal: the first prefill chunk's kernel
    from tinyengine import fused  # fused: decode in float32 on a CPU, timed eager (compiled, the engine calls it as an operator that also writes the cache)
    cases = [("prefill", 1, T) for T in prefill_T] + [("decode", B, S) for S in decode_S for B in size["speed_batches"]]
    bar = bench.Progress("attention", len(cases) * len(backends), not args.no_progress)
    rows, notes = [], []
    g = torch.Generator().manual_seed(0)
    for phase, B, T in cases:
        Tq = T if phase == "prefill" else 1
        q = torch.randn(B, a.num_heads, Tq, a.head_dim, generator=g).to(dev)
        k = torch.randn(B, a.num_kv_heads, T, a.head_dim, generator=g).to(dev)
        v = torch.randn_like(k)
        kv_pos = torch.arange(T, device=dev).expand(B, a.num_kv_heads, T).contiguous()
        q_pos = (torch.arange(Tq, device=dev) + (T - Tq)).expand(B, Tq).contiguous()
        ref = attention(q, k, v, q_pos, kv_pos, backend="reference")
        for backend in backends:
            if (backend == "sdpa-causal" and phase != "prefill") or (backend == "fused" and (
                    phase != "decode" or not fused.usable_for(dev, q.dtype))):
                bar.done(1)
                continue
            bar.doing(f"{phase} {backend} B={B} T={T}")
            for compiled in ((False, True) if phase == "decode" and backend != "fused" else (False,)):
                if backend == "sdpa-causal":
                    fn = lambda: causal_attention(q, k, v)  # noqa: E731
                else:
                    fn = lambda: attention(q, k, v, q_pos, kv_pos, backend=backend)  # noqa: E731
                if compiled:
                    torch._dynamo.reset()  # each case is a new function: do not run into the recompile limit
                    fn = torch.compile(fn, fullgraph=True, dynamic=False)
                try:
                    t0 = time.perf_counter()
                    out = fn()  # compiles (flex, or the compiled variant)
                    warm = time.perf_counter() - t0
                    reps = 3 if phase == "prefill" else 20
                    times = [timed(fn, dev)[0] for _ in range(reps)]
                    rows.append({"table": "attention", "phase": phase, "backend": backend, "compiled": compiled, "batch": B,
                                 "tokens": T, "ms": 1000 * statistics.median(times), "first_call_s": warm,
                                 "max_abs_err": (out - ref).abs().max().item()})
                except Exception as e:  # a backend that does not run here is a finding, not a crash
                    notes.append(f"{phase} {backend}{' compiled' if compiled else ''} B={B} T={T} failed: {error_line(e)}")
            bar.done(1)
    bar.close()
    rows += linear_rows(a, dev, size["linear_rows"])
    save(args, "attention", rows, notes, {"prefill_tokens": prefill_T, "decode_slots": decode_S,
                                           "heads": [a.num_heads, a.num_kv_heads, a.head_dim]}, started)


def linear_rows(a, dev, row_counts: list[int], max_bytes: int = 2**30, reps: int = 7) -> list[dict]:
    """The weight products of one decode step: every matrix of the model at its shape (random
    weights; as many layers as fit in `max_bytes`), times a few rows, in each form of
    models/linear_forms.py (F.linear, W @ x^T, and on CPU oneDNN's kernel on copies packed into its
    layout, made before timing) and as the engine runs them (`linear` after `measure` chose a form
    per shape on these matrices: "tinyengine", with the forms it chose). Milliseconds per pass, median
    of `reps`, and the weight bytes read per second."""
    from models import linear_forms

    g = torch.Generator().manual_seed(0)
    h, i, qd, kvd = a.hidden_size, a.intermediate_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    layer = [(qd, h), (kvd, h), (kvd, h), (h, qd), (i, h), (i, h), (h, i)]
    per_layer = 4 * sum(n * k for n, k in layer)
    head = 4 * a.vocab_size * h
    layers = max(1, min(a.num_layers, (max_bytes - head) // per_layer))
    mats = [torch.randn(n, k, generator=g).to(dev) for _ in range(layers) for n, k in layer]
    mats.append(torch.randn(a.vocab_size, h, generator=g).to(dev))
    nbytes = sum(4 * w.numel() for w in mats)
    on_cpu = dev.type == "cpu"
    packed = {id(w): linear_forms.pack(w) for w in mats} if on_cpu and torch.backends.mkldnn.is_available() else {}
    forms = [("F.linear", linear_forms.FORMS["F.linear"])] + ([("W @ x^T", linear_forms.FORMS["W @ x^T"])] if on_cpu else [])
    if packed:
        forms.append(("packed", linear_forms.FORMS["packed"]))
    forms.append(("tinyengine", lambda x, w, p: linear_forms.linear(x, w, packed=p)))
    out = []
    for r in row_counts:
        xs = {k: torch.randn(r, k, generator=g).to(dev) for k in {w.shape[1] for w in mats}}
        ref = torch.nn.functional.linear(xs[h], mats[-1])  # a pass returns the output layer's product
        chosen = {}  # (out, in, ...) -> the form the engine runs for this shape
        if on_cpu:
            linear_forms.measure([(w, packed.get(id(w))) for w in mats], r)
            keys = dict.fromkeys(linear_forms.key(w, r, packed.get(id(w))) for w in mats)
            chosen = {k: linear_forms.FASTEST.get(k, "F.linear") for k in keys}
        for form, fn in forms:
            def one_pass():
                for w in mats:
                    y = fn(xs[w.shape[1]], w, packed.get(id(w)))
                return y
            err = (one_pass() - ref).abs().max().item()
            times = [timed(one_pass, dev)[0] for _ in range(reps)]
            ms = 1000 * statistics.median(times)
            row = {"table": "linear", "form": form, "rows": r, "layers": layers, "weight_mb": nbytes / 1e6,
                   "ms": ms, "gb_s": nbytes / ms / 1e6, "max_abs_err": err}
            if form == "tinyengine" and chosen:  # "out x in: form" for each shape
                row["chosen"] = {f"{k[0]}x{k[1]}": v for k, v in chosen.items()}
            out.append(row)
    return out
