"""Tensor parallelism: every rank holds a slice of each layer's heads and MLP (the idea of gpt-fast's tp.py).

With W ranks, rank r holds

    q_proj, k_proj, v_proj   the rows of its heads (q heads r*Hq/W.., kv heads r*Hkv/W..)
    o_proj                   the matching columns
    gate_proj, up_proj       a block of rows of the intermediate size
    down_proj                the matching columns
    embeddings, norms, lm_head, q_norm/k_norm   whole (replicated)

A column-parallel projection followed by a row-parallel one needs no communication in
between: rank r computes its heads' attention (or its part of the MLP) from the full hidden
state and multiplies by its columns of o_proj (down_proj), which yields a partial sum of the
block's output. One all-reduce (sum) after o_proj and one after down_proj make the hidden state
whole again, identical on every rank; so 2 all-reduces per layer, each of B x T x hidden.

Query heads come in groups that share a kv head (GQA), and the groups are contiguous, so
rank r's query heads use exactly rank r's kv heads: the number of kv heads must be divisible
by W. The KV cache then lives per rank on its own kv heads (the engine sizes caches from
`model.args`, which here holds the local head counts), and so do the policies: a head-wise
eviction needs nothing from the other ranks, and a score averaged over all query heads of a
layer goes through `tinyengine.dist.head_mean`, which all-reduces it.

The all-reduces are forward hooks calling the functional collective, so they trace into the
compiled decode step; the model code itself stays single-process.

Each rank reads only its slices from the memory-mapped safetensors files
(`safe_open(...).get_slice(name)[rows]`), so no rank ever holds the whole model.

Run it with torchrun (rendezvous, multi-node and restarts are torchrun's job):

    torchrun --nproc-per-node 3 generate.py --policy momentkv --budget 128 --prompt "..."
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models.llama import ModelArgs, Transformer, rope_frequencies
from tinyengine.errors import TinyEngineError
from tinyengine.weights import IGNORED_SUFFIXES, _assign, read_config, safetensors_files

# How each sharded tensor is split: dim 0 = by rows (output features), dim 1 = by columns.
# The value says which size is split: query heads, kv heads or the MLP's intermediate size.
SHARDED = {
    "self_attn.q_proj.weight": (0, "heads"), "self_attn.q_proj.bias": (0, "heads"),
    "self_attn.k_proj.weight": (0, "kv_heads"), "self_attn.k_proj.bias": (0, "kv_heads"),
    "self_attn.v_proj.weight": (0, "kv_heads"), "self_attn.v_proj.bias": (0, "kv_heads"),
    "self_attn.o_proj.weight": (1, "heads"),
    "mlp.gate_proj.weight": (0, "mlp"), "mlp.up_proj.weight": (0, "mlp"),
    "mlp.down_proj.weight": (1, "mlp"),
}


def check_world(args: ModelArgs, world: int):
    """Refuse a world size that does not split the heads into whole GQA groups, naming the sizes that do."""
    if args.num_kv_heads % world == 0 and args.num_heads % world == 0:
        return
    fits = [n for n in range(1, args.num_kv_heads + 1) if args.num_kv_heads % n == 0 and args.num_heads % n == 0]
    choices = ", ".join(map(str, fits[:-1])) + f" or {fits[-1]}" if len(fits) > 1 else str(fits[0])
    raise TinyEngineError(
        f"tensor parallel over {world} ranks needs num_key_value_heads ({args.num_kv_heads}) divisible by {world}; "
        f"use --nproc-per-node {choices}"
    )


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's block [start, stop) of `size` (blocks differ by at most one when W does not divide size)."""
    return size * rank // world, size * (rank + 1) // world


def local_args(args: ModelArgs, rank: int, world: int) -> ModelArgs:
    """The model one rank builds: its share of the heads and of the MLP's intermediate size."""
    check_world(args, world)
    start, stop = shard_range(args.intermediate_size, rank, world)
    return dataclasses.replace(args, num_heads=args.num_heads // world, num_kv_heads=args.num_kv_heads // world,
                               intermediate_size=stop - start)


def _block_of(args: ModelArgs, kind: str, rank: int, world: int) -> tuple[int, int]:
    """The block of output features (rows of q/k/v/gate/up; columns of o/down) that rank r owns."""
    if kind == "mlp":
        return shard_range(args.intermediate_size, rank, world)
    heads = args.num_heads if kind == "heads" else args.num_kv_heads
    h0, h1 = shard_range(heads, rank, world)
    return h0 * args.head_dim, h1 * args.head_dim


def load_sharded_model(folder, rank: int, world: int, device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build rank `rank`'s share of the model in `folder` and fill it with only its slices.

    The model is created on the meta device with the local head counts; each tensor is then
    read as a slice of the memory-mapped file (sharded ones) or whole (replicated ones), so the
    rank's peak memory is its shard plus the replicated tensors, never the whole model.
    With world > 1 it adds the all-reduces after o_proj and down_proj (`add_all_reduces`), so
    running it needs the process group of `world` ranks (torchrun + `tinyengine.dist.init_from_env`).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    full = ModelArgs.from_hf_config(read_config(folder))
    args = local_args(full, rank, world)
    device = torch.device(device)
    with torch.device("meta"):
        expected = {name: p.shape for name, p in Transformer(full).named_parameters()}
        model = Transformer(args)
    loaded: set[str] = set()
    for path in safetensors_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name not in expected:
                        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and full.tie_word_embeddings):
                            continue
                        raise TinyEngineError(f"unexpected tensor {name} in {path}: the weights do not match "
                                              f"config.json's {full.family} architecture")
                    piece = f.get_slice(name)
                    shape = tuple(piece.get_shape())
                    if shape != tuple(expected[name]):
                        raise TinyEngineError(f"tensor {name} has shape {list(shape)} but config.json implies "
                                              f"{list(expected[name])}: weights and config disagree")
                    split = SHARDED.get(name.split(".", 3)[-1]) if name.startswith("model.layers.") else None
                    if split is None:
                        tensor = piece[:]  # replicated
                    else:
                        dim, kind = split
                        a, b = _block_of(full, kind, rank, world)
                        tensor = piece[a:b] if dim == 0 else piece[:, a:b]
                    _assign(model, name, tensor.to(device=device, dtype=dtype).contiguous())
                    loaded.add(name)
        except SafetensorError as e:
            raise TinyEngineError(f"corrupt or truncated safetensors file {path}: {e}; re-download it") from None
        except OSError as e:
            raise TinyEngineError(f"cannot read {path}: {e}") from None
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TinyEngineError(f"checkpoint {folder} lacks tensor(s) {shown}; the weights are incomplete")
    model.inv_freq = rope_frequencies(args).to(device)
    model.full_args = full  # the whole model's shape (model.args holds this rank's share)
    if world > 1:
        add_all_reduces(model)
    return model.eval()


def add_all_reduces(model: Transformer, group=None):
    """Sum the partial outputs of o_proj and down_proj over the ranks (forward hooks, as gpt-fast).

    The functional all_reduce traces into torch.compile'd code (the decode step), where the
    eager c10d call would break the graph. The hooks name the group rather than hold it: a
    model that held the group would keep gloo's threads alive past `dist.shutdown`.
    """
    import torch.distributed._functional_collectives as fc

    group = group or dist.group.WORLD
    name = group.group_name if group is not None else None  # None: loaded outside a group, to inspect

    def all_reduce(_module, _inputs, out):
        if name is None:
            raise TinyEngineError("this rank's shard runs only inside its process group: start it with "
                                  "torchrun and call tinyengine.dist.init_from_env before loading")
        return fc.all_reduce(out, "sum", name)

    if getattr(model, "tp_hooks", None):
        return
    model.tp_hooks = []
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            model.tp_hooks.append(block.register_forward_hook(all_reduce))


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the sharded parameters, bytes of the replicated ones) this rank holds."""
    sharded = replicated = 0
    for name, p in model.named_parameters():
        is_sharded = name.startswith("model.layers.") and name.split(".", 3)[-1] in SHARDED
        if is_sharded:
            sharded += p.numel() * p.element_size()
        else:
            replicated += p.numel() * p.element_size()
    return sharded, replicated


def parameter_count(model: Transformer) -> int:
    """Parameters of the whole model, also when this rank holds only its shard (no communication)."""
    full = getattr(model, "full_args", None)
    if full is None:
        return sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(full).parameters())


def shared_seed(seed: int | None) -> int | None:
    """The same sampling seed on every rank: ranks must sample the same token from their
    (identical) logits, so an unseeded run takes rank 0's random seed."""
    if seed is not None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seed
    pick = torch.randint(0, 2**62, (1,)) if dist.get_rank() == 0 else torch.zeros(1, dtype=torch.long)
    if dist.get_backend() == "nccl":
        pick = pick.cuda()
    dist.broadcast(pick, 0)
    return int(pick.item())


# ----------------------------------------------------------------------------- benchmark


def measure_decode(checkpoint: str, prompt_tokens: int = 128, new_tokens: int = 64, policy: str = "full",
                   plan_args: dict | None = None, device: str = "cpu", dtype: str = "float32",
                   compile: bool = False) -> dict:
    """Run one timed generation on this rank (inside torchrun, or alone) and return its timings.

    `checkpoint` is a folder (a tokenizer is not needed: the prompt is random token ids) or
    anything `tinyengine.load` accepts. Every rank runs it; all return the same tokens.
    """
    import time

    from policies import make_plan
    from tinyengine import dist as tpd
    from tinyengine.engine import Engine
    from tinyengine.weights import load_model

    tpd.init_from_env(device)
    dev = torch.device("cuda", torch.cuda.current_device()) if device.startswith("cuda") else torch.device(device)
    folder = Path(checkpoint)
    if not folder.is_dir():
        from tinyengine.checkpoint import resolve_checkpoint

        folder = tpd.first_on_node(lambda: resolve_checkpoint(checkpoint, progress=False))
    dt = getattr(torch, dtype)
    world = tpd.world_size()
    model = (load_sharded_model(folder, tpd.rank(), world, dev, dt) if world > 1 else load_model(folder, dev, dt))
    engine = Engine(model, make_plan(policy, **(plan_args or {})), compile=compile)
    prompt = torch.randint(0, model.args.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate([prompt], 4)  # warm-up (and compilation)
    stamps = []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = engine.generate([prompt], new_tokens, on_tokens=lambda _: (sync(), stamps.append(time.perf_counter())))
    decode_s = stamps[-1] - stamps[0]
    return {"ranks": world, "first_token_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / max(decode_s, 1e-9),
            "new_tokens": len(out[0]), "weight_bytes_per_rank": sum(parameter_bytes(model)),
            "kv_bytes_per_rank": engine.kv_bytes()}


def tp_decode_tokens_per_s(checkpoint: str, ranks=(1, 2, 3), threads_per_rank: int | None = 1,
                           **options) -> dict[int, dict]:
    """`measure_decode` under `torchrun --standalone --nproc-per-node N` for each N in `ranks`.

    Every N, 1 included, goes through torchrun, so the rows are measured alike. Each rank runs
    `threads_per_rank` threads (OMP_NUM_THREADS; torchrun's default is 1); None gives each rank
    cpu_count // N, so every row uses all cores (on a machine shared with other work, OpenMP
    threads that outnumber the free cores spin and collapse the single-rank rate).
    `options` go to `measure_decode`. Returns {N: rank 0's timings}.
    """
    import json
    import os
    import subprocess
    import sys

    results = {}
    for n in ranks:
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // n)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "tinyengine.tp", str(checkpoint), json.dumps(options)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode != 0 or not lines:
            errors = [line for line in run.stderr.splitlines() if "Error" in line or "error:" in line]
            raise TinyEngineError(f"torchrun with {n} ranks failed (exit {run.returncode}): "
                                  f"{(errors or ['(no error line)'])[-1].strip()}")
        results[n] = {**json.loads(lines[-1]), "threads_per_rank": threads}
    return results


if __name__ == "__main__":
    # torchrun --nproc-per-node N -m tinyengine.tp CHECKPOINT '{"new_tokens": 64, "policy": "full"}'
    import json
    import sys

    from tinyengine import dist as _dist

    try:
        timings = measure_decode(sys.argv[1], **(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}))
    except TinyEngineError as e:
        print(f"tinyengine.tp: error: {e}", file=sys.stderr)
        sys.exit(2)
    if _dist.rank() == 0:
        print(json.dumps(timings), flush=True)
    _dist.shutdown()
