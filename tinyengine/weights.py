"""Safetensors -> Transformer, tensor by tensor, never pickling.

The model is built on the meta device (no memory), then each tensor is read from its
memory-mapped safetensors file, checked against the shape the config implies, cast, moved to
the device and assigned as the parameter. Only one tensor is ever held twice, so the peak
memory while loading stays close to the size of the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models.llama import ModelArgs, Transformer, rope_frequencies
from tinyengine.errors import TinyEngineError

# Tensors some checkpoints carry that the model recomputes instead.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise TinyEngineError(f"no config.json in {folder}: a checkpoint folder needs config.json, *.safetensors and a tokenizer")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyEngineError(f"{path} is not valid JSON ({e}); re-download it") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those the shard index names, else model.safetensors, else all *.safetensors.

    (Some repos ship the same weights twice, e.g. Mistral's consolidated.safetensors next to
    its Hugging Face shards; the index says which set is the Hugging Face one.)
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise TinyEngineError(f"{index} is not a valid shard index ({e!r}); re-download it") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise TinyEngineError(f"{folder} lacks shard(s) {', '.join(missing)} listed in {index.name}; re-download it")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TinyEngineError(f"no *.safetensors file in {folder} (tinyengine loads safetensors only, never .bin pickles)")
    return files


def load_model(folder, device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the model `folder/config.json` describes and fill it from `folder/*.safetensors`."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    args = ModelArgs.from_hf_config(read_config(folder))
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.named_parameters()}
    # float32 on CPU from a float32 file: parameters are views of the memory-mapped file (no copy).
    # Otherwise each tensor is copied (cast / moved), and its file is mapped only while that one
    # tensor is read, so file pages already copied do not stay resident next to the copies.
    loaded: set[str] = set()
    for path in safetensors_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if not _check(name, tuple(f.get_slice(name).get_shape()), expected, args, path):
                        continue
                    if _zero_copy(f.get_slice(name).get_dtype(), dtype, device):
                        tensor = f.get_tensor(name)
                    else:
                        with safe_open(path, framework="pt") as one:
                            tensor = one.get_tensor(name).to(device=device, dtype=dtype, copy=True)
                    _assign(model, name, tensor)
                    loaded.add(name)
        except SafetensorError as e:
            raise TinyEngineError(f"corrupt or truncated safetensors file {path}: {e}; re-download it") from None
        except OSError as e:
            raise TinyEngineError(f"cannot read {path}: {e}") from None
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TinyEngineError(f"checkpoint {folder} lacks tensor(s) {shown}; the weights are incomplete")
    # Non-persistent buffers are not in the checkpoint: compute them on the real device.
    model.inv_freq = rope_frequencies(args).to(device)
    return model.eval()


def _check(name, shape, expected, args, path) -> bool:
    """True if `name` is a parameter of the model with the right shape; False if it is to be skipped."""
    if name not in expected:
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and args.tie_word_embeddings):
            return False  # recomputed, or tied: the output layer *is* the embedding
        raise TinyEngineError(f"unexpected tensor {name} in {path}: the weights do not match config.json's "
                              f"{args.family} architecture")
    if shape != tuple(expected[name]):
        raise TinyEngineError(f"tensor {name} has shape {list(shape)} but config.json implies "
                              f"{list(expected[name])}: weights and config disagree")
    return True


def _zero_copy(file_dtype: str, dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(file_dtype) == dtype


def _assign(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
