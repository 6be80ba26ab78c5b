"""tinyengine: a small LLM inference engine whose static KV cache is run by eviction policies.

    import tinyengine
    model, tokenizer = tinyengine.load("smollm2-135m")
    engine = tinyengine.Engine(model, tinyengine.make_plan("snapkv+momentum", budget=256, decode_budget=128))
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
    print(tokenizer.decode(engine.generate([ids], 64, stop_ids=tokenizer.stop_token_ids)[0]))
"""
from __future__ import annotations

import torch

from policies import make_plan
from tinyengine.engine import Engine, Sampling
from tinyengine.errors import TinyEngineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["load", "Engine", "Sampling", "make_plan", "TinyEngineError", "DTYPES"]


def load(checkpoint: str = "smollm2-135m", device: str = "cpu", dtype: str = "float32", progress: bool = True):
    """Resolve a checkpoint (alias, Hub id, local folder or .gguf) -> (model, tokenizer)."""
    from tinyengine.checkpoint import resolve_checkpoint
    from tinyengine.tokenizer import Tokenizer
    from tinyengine.weights import load_model

    if dtype not in DTYPES:
        raise TinyEngineError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TinyEngineError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TinyEngineError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise TinyEngineError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    from tinyengine import dist

    world = dist.world_size()
    if world == 1:
        folder = resolve_checkpoint(checkpoint, progress=progress)
        return load_model(folder, device=dev, dtype=DTYPES[dtype]), Tokenizer.from_folder(folder)
    # Tensor parallel (torchrun): each node's first rank converts or downloads the checkpoint once,
    # then every rank loads only its slices onto its own GPU.
    from tinyengine.tp import load_sharded_model

    folder = dist.first_on_node(lambda: resolve_checkpoint(checkpoint, progress=progress))
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())  # init_from_env set it from LOCAL_RANK
    model = load_sharded_model(folder, dist.rank(), world, device=dev, dtype=DTYPES[dtype])
    return model, Tokenizer.from_folder(folder)
