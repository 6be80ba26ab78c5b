"""The fused CPU decode kernels (tinyengine/decode_kernel.c): a decode step's cache write and its
attention over a layer's cache slots in one pass over its keys and values, with NC's virtual slot
and MomentKV's per-slot score (each head's slots split in ranges when that keeps every thread busy);
and, once per step for every layer, MomentKV's score update, the moments' update and the victim choice.

Why: an eager decode step on a CPU pays per torch op (5 to 20 us each), and attention over the
cache is a dozen ops per layer (scores, scale, mask, softmax, output; NC adds its virtual slot,
MomentKV's MI a matmul over the values and ~20 elementwise ops): for SmolLM2's 30 layers that was
most of what MomentKV cost over full (BENCHMARKS.md, decode speed against context length). The
kernel reads each key once and each value twice (the second time from cache, for ||v_i - o||^2).

They compute what the torch code computes, to float32 rounding: `reference_attention` (plain),
`nc_attention` (with moments), `mi_cost_decode` + the head mean (MomentKV's score),
`momentum_update` + `recent_mask`, `Correction.absorb_slots` and `choose_victim` (the victims
exactly), compared on random inputs in tests/test_fused.py. That torch code stays the reference,
the CUDA path, and the path for other dtypes or when the kernels are unavailable.

Built on first use: the system C compiler (`cc`, -O3 -march=native -fopenmp) compiles the
source into $TINYENGINE_CACHE/kernels/ (a second or two; keyed by the source, the compiler
and the CPU's flags), loaded with ctypes. Its OpenMP is torch's own (the libgomp.so.1 torch has
loaded), so the kernel shares torch's threads. No compiler, or TINYENGINE_FUSED=0:
`available()` is False and the engine takes the torch path.

In a compiled decode step each kernel is an operator (torch.library, at the end of this file)
whose schema marks the arguments it writes, so inductor keeps those buffers in place: the cache
above all, which is why the attention kernel also does the step's cache write (called on a cache
that torch ops had just written, inductor copied the whole cache around the call). Inductor fuses
the rest of the step. What it costs against the torch code: BENCHMARKS.md, attention backends
(the kernel against compiled reference and SDPA per layer) and decode speed against context
length (the compiled rows).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_kernel.c")
_lib = None  # the loaded kernels (ctypes), False once building them failed
_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
SIGNATURES = {  # decode_kernel.c's functions: argument types
    "decode_attention": [_i64] * 5 + [_ptr] * 4 + [_i64] + [_ptr] * 10 + [_i64, _ptr, _i64, _f32, _i64, _int],
    "momentum_scores": [_i64] * 4 + [_ptr] * 6 + [_f32] * 2 + [_ptr, _int],
    "absorb_slots": [_i64] * 4 + [_ptr] * 9 + [_int],
    "choose_victim": [_i64] * 4 + [_ptr] * 5 + [_int],
    "momentum_step_end": [_i64] * 5 + [_ptr] * 5 + [_f32] * 2 + [_ptr] * 10 + [_int],
}


def _cpu_flags() -> str:
    try:
        return next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return ""


def _build() -> Path:
    from tinyengine.checkpoint import cache_dir

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) found")
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, version, " ".join(flags), _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"decode_kernel-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{cc} failed: {result.stderr.strip()[:400]}")
            os.replace(built, target)  # atomic: a concurrent build loads one or the other, both whole
    return target


def _load():
    global _lib
    if _lib is None:
        _lib = False
        if os.environ.get("TINYENGINE_FUSED", "1") != "0":
            try:
                lib = ctypes.CDLL(str(_build()))
            except (OSError, RuntimeError) as e:
                import warnings

                warnings.warn(f"tinyengine: the fused CPU decode kernels are unavailable ({e}); using the torch path")
            else:
                for name, argtypes in SIGNATURES.items():
                    getattr(lib, name).argtypes = argtypes
                lib.decode_attention.restype = lib.momentum_step_end.restype = ctypes.c_int
                _lib = lib
    return _lib


def available() -> bool:
    """The kernel is built (or buildable) and enabled."""
    return bool(_load())


def usable_for(device, dtype) -> bool:
    """The decode kernel serves an engine on this device with this dtype (float32 on the CPU)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and available()


def decode_attention(q, k, v, q_pos, kv_pos, moments=None, want_probs=False, mi_weight=None, score_out=None, parts=0,
                     write=None, probs_out=None):
    """q [B, Hq, 1, D], k, v [B, Hkv, S, D], q_pos [B], kv_pos [B, Hkv, S]; moments: one layer's
    (n, mu_k, mu_v, C) for NC, or None. mi_weight: also MomentKV's per-slot score (needs moments),
    written into score_out [B, Hkv, S] if given (its rows may be strided: a layer's view of the
    engine's [L, B, Hkv, S_max] step buffer, so the step's scores need no stacking). parts: split
    each head's slots into this many ranges (0: as the threads need to be evenly busy).
    write: (k_new, v_new [B, Hkv, 1, D], slot [B, Hkv]): first write the step's token into the
    cache (k, v contiguous, kv_pos's rows evenly spaced), as KVCache.write does. probs_out [B, Hq, S]
    (with want_probs): write the probabilities there (evenly spaced rows, as score_out: a layer's view
    of the engine's [L, B, Hq, S_max] buffer, so the step's probabilities need no stacking).
    -> (out [B, Hq, 1, D], probs [B, Hq, 1, S] or None, score [B, Hkv, S] or None)."""
    if q.shape[2] != 1 or q.dtype != torch.float32 or k.dtype != torch.float32 or q.device.type != "cpu":
        raise ValueError(f"the fused decode kernel takes one float32 CPU query per head (got {list(q.shape)} {q.dtype} on {q.device})")
    if torch.compiler.is_compiling():  # in a compiled step: as an operator that declares what it writes
        if write is None:
            raise RuntimeError("compiled, the fused decode kernel must also write the step's token (write=...): "
                               "written by torch ops first, the cache would be copied around the kernel")
        score = score_out if score_out is not None else q.new_empty(0)
        out, probs = torch.ops.tinyengine.decode_attention(q, k, v, q_pos, kv_pos, *write, list(moments or ()), score, want_probs,
                                         float(mi_weight or 0.0), mi_weight is not None and score_out is not None)
        return out, probs if want_probs else None, score_out
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, Hq, 1, D)
    probs, probs_stride = (torch.empty(B, Hq, 1, S), S) if want_probs else (None, 0)
    if want_probs and probs_out is not None:
        probs, probs_stride = probs_out[:, :, None], _row_stride(probs_out)
        if probs_out.shape != (B, Hq, S) or probs_out.dtype != torch.float32 or probs_stride is None:
            raise ValueError(f"probs_out must be float32 {[B, Hq, S]} with evenly spaced rows (got {list(probs_out.shape)}, "
                             f"strides {probs_out.stride()})")
    score, score_stride = score_out if mi_weight is not None else None, 0
    if score is None and mi_weight is not None:
        score, score_stride = torch.empty(B, Hkv, S), S
    elif score is not None:
        score_stride = _row_stride(score)
        if score.shape != (B, Hkv, S) or score.dtype != torch.float32 or score_stride is None:
            raise ValueError(f"score_out must be float32 {[B, Hkv, S]} with evenly spaced rows (got {list(score.shape)}, "
                             f"strides {score.stride()})")
    pos_stride = _row_stride(kv_pos)
    if write is not None and not (k.is_contiguous() and v.is_contiguous() and pos_stride is not None):
        raise ValueError("the fused decode kernel writes the step's token into contiguous K and V and evenly spaced positions")
    if pos_stride is None:  # (read only: a copy will do)
        kv_pos, pos_stride = kv_pos.contiguous(), S
    new = [t.contiguous() for t in write] if write is not None else []
    q, k, v, q_pos = q.contiguous(), k.contiguous(), v.contiguous(), q_pos.contiguous()  # (held here: the kernel reads them)
    moments = [t.contiguous() for t in moments or ()]
    pointers = ([q.data_ptr(), k.data_ptr(), v.data_ptr(), kv_pos.data_ptr(), pos_stride, q_pos.data_ptr()]
                + ([t.data_ptr() for t in new] or [None] * 3) + ([t.data_ptr() for t in moments] or [None] * 4))  # none: NULL
    failed = _lib.decode_attention(B, Hkv, Hq // Hkv, S, D, *pointers, out.data_ptr(), None if probs is None else probs.data_ptr(),
                                   probs_stride, None if score is None else score.data_ptr(), score_stride,
                                   float(mi_weight or 0.0), parts, torch.get_num_threads())
    if failed:
        raise MemoryError("tinyengine's fused decode kernel could not allocate its scratch")
    return out, probs, score


def _row_stride(t):
    """The distance between consecutive rows of a [B, H, S] tensor whose B * H rows of S are evenly
    spaced and each contiguous (a layer's view of an engine buffer [L, B, H, S_max]), or None."""
    B, H, S = t.shape
    step = t.stride(1) if H > 1 else t.stride(0) if B > 1 else S
    if (S > 1 and t.stride(2) != 1) or (B > 1 and t.stride(0) != H * step) or (B * H > 1 and step < S):
        return None
    return step


def momentum_scores(s, a, written, beta: float, age=None, pos=None, recent=None, protect: float = 1e30):
    """MomentKV's step-end update (decode_kernel.c, momentum_scores): the same as
    policies.momentum.momentum_update(s, a, written, beta, True, age) followed, with `recent` [B],
    by masking policies.base.recent_mask(pos, recent) to `protect`; to float32 rounding (tested).
    s, a, age, pos [..., B, Hkv, S] (s and age updated in place), written [..., B, Hkv]. None where the
    kernel does not apply (not built, not contiguous float32 on the CPU): use the torch code."""
    if not _applies(s, *((age,) if age is not None else ())) or a.dtype != torch.float32:
        return None
    if torch.compiler.is_compiling():  # as an operator that declares what it writes (end of this file)
        none = s.new_empty(0, dtype=torch.long)
        return torch.ops.tinyengine.momentum_scores(s, a, written, beta, age if age is not None else s.new_empty(0),
                                  pos if recent is not None else none, recent if recent is not None else none, protect)
    B, Hkv, S = s.shape[-3:]
    rows = s.numel() // S
    rank = torch.empty_like(s)
    a, written = a.contiguous(), written.contiguous()  # (held here: the kernel reads their memory)
    pos = pos.contiguous() if recent is not None else None
    recent = recent.contiguous() if recent is not None else None
    _lib.momentum_scores(rows, B, Hkv, S, s.data_ptr(), a.data_ptr(), written.data_ptr(),
                  age.data_ptr() if age is not None else None, pos.data_ptr() if pos is not None else None,
                  recent.data_ptr() if recent is not None else None, beta, protect, rank.data_ptr(), torch.get_num_threads())
    return rank


def _applies(*tensors) -> bool:
    """The step-end kernels apply: built, and contiguous float32 CPU tensors (eager, or in a compiled
    step as operators)."""
    built = bool(_lib) if torch.compiler.is_compiling() else available()  # (never build while tracing: dynamo cannot trace it)
    return built and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def absorb_slots(slots, keys, values, pos, n, mu_k, mu_v, C) -> bool:
    """Correction.absorb_slots in one C pass (decode_kernel.c): keys, values lists of every layer's
    [B, Hkv, S_l, D], slots [L, B, Hkv], pos [L, B, Hkv, S], the moments [L, B, Hkv, ...] updated in
    place. False (nothing done) where it does not apply: use the torch code."""
    if not _applies(keys[0], values[0], n, mu_k, mu_v, C):  # every layer's cache: one dtype, contiguous (KVCache)
        return False
    if torch.compiler.is_compiling():
        torch.ops.tinyengine.absorb_slots(slots, list(keys), list(values), pos, n, mu_k, mu_v, C)
        return True
    L, S, D = len(keys), pos.shape[-1], keys[0].shape[-1]
    caps, key_ptrs, value_ptrs = _layer_pointers(keys, values)
    slots, pos = slots.contiguous(), pos.contiguous()
    _lib.absorb_slots(L, n[0].numel(), S, D, caps.data_ptr(), slots.data_ptr(), key_ptrs, value_ptrs, pos.data_ptr(),
                      n.data_ptr(), mu_k.data_ptr(), mu_v.data_ptr(), C.data_ptr(), torch.get_num_threads())
    return True


def _layer_pointers(keys, values):
    """Every layer's cache for the C step-end kernels: (capacities [L] int64, key and value addresses)."""
    addresses = ctypes.c_void_p * len(keys)
    return (torch.tensor([k.shape[2] for k in keys]), addresses(*[k.data_ptr() for k in keys]),
            addresses(*[v.data_ptr() for v in values]))


def _address(t):
    return None if t is None else t.data_ptr()  # (None: NULL)


def choose_victim(scores, pos, pool_from, pool_budget):
    """policies.base.choose_victim with the pool = the valid slots holding a position >= pool_from [B],
    in one C pass (decode_kernel.c): [..., B, Hkv, S] -> [..., B, Hkv]. None where it does not apply:
    use the torch code."""
    if not _applies(scores):
        return None
    if torch.compiler.is_compiling():
        return torch.ops.tinyengine.choose_victim(scores, pos, pool_from, pool_budget)
    B, Hkv, S = scores.shape[-3:]
    pos, pool_from, pool_budget = pos.contiguous(), pool_from.contiguous(), pool_budget.contiguous()
    victim = torch.empty(scores.shape[:-1], dtype=torch.long)
    _lib.choose_victim(victim.numel(), B, Hkv, S, scores.data_ptr(), pos.data_ptr(), pool_from.data_ptr(),
                       pool_budget.data_ptr(), victim.data_ptr(), torch.get_num_threads())
    return victim


def momentum_step_end(s, a, age, pos, recent, beta: float, protect: float, pool_from, pool_budget, slot,
                      keys=None, values=None, moments=None) -> bool:
    """MomentKV's step end in one C pass (decode_kernel.c): `momentum_scores` (s, age updated in place),
    `choose_victim` on its ranks, `absorb_slots` of the victims into moments (n, mu_k, mu_v, C) [L, B,
    Hkv, ...] if given, with keys, values every layer's cache; then pos [L, B, Hkv, S] is -1 at each
    victim and slot [L, B, Hkv] (the slots the step wrote, read first) holds the victims. False
    (nothing done) where it does not apply: take those four steps instead."""
    n, mu_k, mu_v, C = moments or (None,) * 4
    floats = [t for t in (s, a, age, n, mu_k, mu_v, C) if t is not None] + ([keys[0], values[0]] if moments else [])
    if not _applies(*floats) or not all(t.is_contiguous() for t in (pos, slot, pool_from, pool_budget, recent) if t is not None):
        return False
    if torch.compiler.is_compiling():  # as an operator that declares what it writes (end of this file); empty: none
        age, recent, n, mu_k, mu_v, C = (t if t is not None else s.new_empty(0) for t in (age, recent, n, mu_k, mu_v, C))
        torch.ops.tinyengine.momentum_step_end(s, a, age, pos, recent, beta, protect, pool_from, pool_budget, slot,
                                               list(keys) if moments else [], list(values) if moments else [], n, mu_k, mu_v, C)
        return True
    L, B, Hkv, S = s.shape
    caps, key_ptrs, value_ptrs = _layer_pointers(keys, values) if moments else (None,) * 3
    failed = _lib.momentum_step_end(L, B, Hkv, S, mu_k.shape[-1] if moments else 0, s.data_ptr(), a.data_ptr(), _address(age),
                                    pos.data_ptr(), _address(recent), beta, protect, pool_from.data_ptr(), pool_budget.data_ptr(),
                                    _address(caps), key_ptrs, value_ptrs, _address(n), _address(mu_k), _address(mu_v),
                                    _address(C), slot.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("tinyengine's momentum_step_end kernel could not allocate its scratch")
    return True


# The kernels as operators for a compiled step: each schema marks what it writes (Tensor(a!)), so
# inductor keeps those buffers in place. Defined with torch.library.Library rather than the
# custom_op decorator, whose Python wrapping cost ~60 us a call here (30 calls a step).
_ops = torch.library.Library("tinyengine", "DEF")
_ops.define("decode_attention(Tensor q, Tensor(a!) k, Tensor(b!) v, Tensor q_pos, Tensor(c!) kv_pos, Tensor k_new, "
            "Tensor v_new, Tensor slot, Tensor[] moments, Tensor(d!) score, bool want_probs, float mi_weight, "
            "bool want_score) -> (Tensor, Tensor)")
_ops.define("momentum_scores(Tensor(a!) s, Tensor a, Tensor written, float beta, Tensor(b!) age, Tensor pos, "
            "Tensor recent, float protect) -> Tensor")
_ops.define("absorb_slots(Tensor slots, Tensor[] keys, Tensor[] values, Tensor pos, Tensor(a!) n, Tensor(b!) mu_k, "
            "Tensor(c!) mu_v, Tensor(d!) C) -> ()")
_ops.define("choose_victim(Tensor scores, Tensor pos, Tensor pool_from, Tensor pool_budget) -> Tensor")
_ops.define("momentum_step_end(Tensor(a!) s, Tensor a, Tensor(b!) age, Tensor(c!) pos, Tensor recent, float beta, "
            "float protect, Tensor pool_from, Tensor pool_budget, Tensor(d!) slot, Tensor[] keys, Tensor[] values, "
            "Tensor(e!) n, Tensor(f!) mu_k, Tensor(g!) mu_v, Tensor(h!) C) -> ()")


def _decode_attention_op(q, k, v, q_pos, kv_pos, k_new, v_new, slot, moments, score, want_probs, mi_weight, want_score):
    """decode_attention(..., write=...); the score is written only with want_score (into `score`,
    the engine's step buffer); probs: empty unless want_probs."""
    out, probs, _ = decode_attention(q, k, v, q_pos, kv_pos, moments or None, want_probs, mi_weight if want_score else None,
                                     score if want_score else None, write=(k_new, v_new, slot))
    return out, probs if probs is not None else q.new_empty(0)


def _momentum_scores_op(s, a, written, beta, age, pos, recent, protect):  # age, recent: empty for none
    return momentum_scores(s, a, written, beta, age if age.numel() else None, pos, recent if recent.numel() else None, protect)


def _momentum_step_end_op(s, a, age, pos, recent, beta, protect, pool_from, pool_budget, slot, keys, values, n, mu_k, mu_v, C):
    """momentum_step_end; age, recent and the moments (n first): empty for none."""
    momentum_step_end(s, a, age if age.numel() else None, pos, recent if recent.numel() else None, beta, protect, pool_from,
                      pool_budget, slot, keys, values, (n, mu_k, mu_v, C) if n.numel() else None)


_ops.impl("decode_attention", _decode_attention_op, "CPU")
_ops.impl("momentum_step_end", _momentum_step_end_op, "CPU")
_ops.impl("momentum_scores", _momentum_scores_op, "CPU")
_ops.impl("absorb_slots", lambda *args: absorb_slots(*args) and None, "CPU")
_ops.impl("choose_victim", choose_victim, "CPU")
torch.library.register_fake("tinyengine::decode_attention", lib=_ops)(
    lambda q, k, *rest: (q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1], 1, k.shape[2]) if rest[-3] else (0,))))
torch.library.register_fake("tinyengine::momentum_scores", lib=_ops)(lambda s, *rest: torch.empty_like(s))
torch.library.register_fake("tinyengine::absorb_slots", lib=_ops)(lambda *args: None)
torch.library.register_fake("tinyengine::momentum_step_end", lib=_ops)(lambda *args: None)
torch.library.register_fake("tinyengine::choose_victim", lib=_ops)(
    lambda scores, *rest: scores.new_empty(scores.shape[:-1], dtype=torch.long))
