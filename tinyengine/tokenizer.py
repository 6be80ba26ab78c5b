"""Tokenizer, chat template and streaming detokenizer, without transformers.

`Tokenizer.from_folder` reads tokenizer.json with the `tokenizers` library (or a sentencepiece
tokenizer.model), tokenizer_config.json for the special tokens and the chat template, and
generation_config.json for the stop tokens. Chat templates are rendered with jinja2 in the same
environment transformers' `apply_chat_template` builds, so prompts are byte-identical.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tinyengine.errors import TinyEngineError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyEngineError(f"{path} is not valid JSON ({e}); re-download it") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class _TokenizersBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TinyEngineError(f"cannot read {path}: {e}; re-download it") from None

    def encode(self, text, add_special_tokens):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """A sentencepiece tokenizer.model encoded as transformers' LlamaTokenizer does: BOS prepended
    unless tokenizer_config says add_bos_token false, EOS appended if add_eos_token. (Special-token
    strings inside the text are plain text here, unlike with tokenizer.json.)"""

    def __init__(self, path: Path, config: dict):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TinyEngineError(f"cannot read sentencepiece model {path}: {e}; re-download it") from None
        self.add_bos = config.get("add_bos_token", True)
        self.add_eos = config.get("add_eos_token", False)
        self.special_ids = {i for i in range(self.sp.GetPieceSize()) if self.sp.IsControl(i) or self.sp.IsUnknown(i)}
        self.dummy_prefix = self.sp.EncodeAsPieces("a")[0].startswith("\u2581")

    def encode(self, text, add_special_tokens):
        # sentencepiece prepends its "▁" even to text that starts with a space; transformers'
        # Metaspace(prepend_scheme="first") does not, so " x" is "▁x", not "▁▁x".
        if self.dummy_prefix and text.startswith(" "):
            text = text[1:]
        ids = self.sp.EncodeAsIds(text)
        if add_special_tokens:
            ids = ([self.sp.bos_id()] if self.add_bos and self.sp.bos_id() >= 0 else []) + ids
            ids = ids + ([self.sp.eos_id()] if self.add_eos and self.sp.eos_id() >= 0 else [])
        return ids

    def decode(self, ids, skip_special_tokens):
        ids = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        return self.sp.DecodeIds(ids)

    def token_to_id(self, token):
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i

    @property
    def vocab_size(self):
        return self.sp.GetPieceSize()


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied when tokenizer_config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    def __init__(self, backend, config: dict, generation_config: dict):
        self.backend = backend
        self.config = config
        self.special_tokens = {n: _token_text(config[n]) for n in SPECIAL_TOKEN_NAMES if _token_text(config.get(n))}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(extra, list) and extra:
            self.special_tokens["additional_special_tokens"] = [_token_text(t) for t in extra]
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.generation_config = generation_config

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        template_file = folder / "chat_template.jinja"  # newer checkpoints keep the template apart
        if "chat_template" not in config and template_file.is_file():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        if (folder / "tokenizer.json").is_file():
            backend = _TokenizersBackend(folder / "tokenizer.json")
        elif (folder / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(folder / "tokenizer.model", config)
        else:
            raise TinyEngineError(f"no tokenizer in {folder}: put tokenizer.json (or a sentencepiece tokenizer.model) next to config.json")
        return cls(backend, config, _read_json(folder / "generation_config.json"))

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(ids, skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def token_id(self, name: str) -> int | None:
        """Id of a special token by role ("eos_token", ...), None when the tokenizer has none."""
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def stop_token_ids(self) -> list[int]:
        """generation_config.json's eos_token_id (an int or a list) plus the tokenizer's eos."""
        ids = self.generation_config.get("eos_token_id")
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        eos = self.token_id("eos_token")
        if eos is None and isinstance(self.backend, _SentencePieceBackend) and self.backend.sp.eos_id() >= 0:
            eos = self.backend.sp.eos_id()
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    # ------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) as transformers'
        `apply_chat_template(..., tokenize=False)` does."""
        if not self.chat_template:
            raise TinyEngineError("this checkpoint's tokenizer has no chat template; prompt it without --chat")
        from jinja2.exceptions import TemplateError

        template = _compile_template(self.chat_template)
        variables = {**self.special_tokens, **kwargs}  # as transformers: kwargs override special tokens
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as e:
            raise TinyEngineError(f"the chat template refused the conversation: {e}") from None


@lru_cache(maxsize=8)
def _compile_template(source: str):
    """transformers' chat-template environment: sandboxed, trim_blocks + lstrip_blocks, loop
    controls, a `{% generation %}` block (rendered as its body), `raise_exception`,
    `strftime_now` and a `tojson` that does not escape HTML."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TinyEngineError(f"the checkpoint's chat template is not valid jinja ({e})") from None


class StreamDecoder:
    """Incremental detokenization: push token ids one by one, get the new printable text.

    Decoding token by token breaks multi-byte characters (an emoji spans several byte-level
    tokens) and sentencepiece's leading spaces, so each step decodes a short window of recent
    tokens and emits what it adds over the window without the new tokens. Text ending in an
    incomplete UTF-8 sequence (U+FFFD) is held back until the sequence completes.
    Concatenating all `push` results and `flush()` gives `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoded for context only
        self.read = 0  # tokens before this index have been emitted

    def _decode(self, ids):
        return self.tokenizer.backend.decode(ids, self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]
