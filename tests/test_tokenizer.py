"""Tokenizer, chat template and streaming detokenizer equal transformers'."""
import json

import pytest
from helpers import CHAT_TEMPLATE, CORPUS, write_tiny_checkpoint
from hypothesis import given
from hypothesis import strategies as st

from tinyengine.checkpoint import embedded_gguf
from tinyengine.errors import TinyEngineError
from tinyengine.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "numbers 3.14159 and 1234567890, 2**10",
    "naïve café, Ünïcödé, 東京タワー, Привет, مرحبا",
    "emoji 😀👍🏽🇫🇷 and a family 👨‍👩‍👧",
    "code: def f(x):\n    return x * 2  # comment",
    "<|im_start|>user\nHi<|im_end|>\n",  # special tokens in text are parsed as special
    "don't, I'm, it's, we've, they're",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Spain?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke 😀"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces\n\nand lines  "}],
]


@pytest.fixture(scope="module")
def smol(smollm2):
    from transformers import AutoTokenizer

    gguf = embedded_gguf()
    return (Tokenizer.from_folder(smollm2), AutoTokenizer.from_pretrained(smollm2),
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(smol, text):
    ours, hf, hf_gguf = smol
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    # transformers' GGUF tokenizer prepends <|im_start|> as a BOS although the GGUF says
    # add_bos_token=False (and swaps bos/eos); without special tokens it agrees with us.
    assert ours.encode(text, add_special_tokens=False) == hf_gguf.encode(text, add_special_tokens=False) == ids
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def test_digits_are_split_like_smollm2(smol):
    ours, _, _ = smol
    pieces = [ours.decode([i]) for i in ours.encode("year 2024")]
    assert pieces[-4:] == ["2", "0", "2", "4"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(smol, messages, add_generation_prompt):
    ours, hf, hf_gguf = smol
    mine = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert mine == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert mine == hf_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert mine.endswith("<|im_start|>assistant\n") == add_generation_prompt


# A template using everything transformers' environment offers: loop controls, tojson, special
# token variables, strftime_now, raise_exception, {% generation %}, extra kwargs, trim/lstrip blocks.
RICH_TEMPLATE = """{{ bos_token }}
{%- if tools %}Tools: {{ tools | tojson }}
{% endif %}
{%- for m in messages %}
    {%- if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
    {%- if m.role == 'system' and not show_system %}{% continue %}{% endif %}
    {% if m.role == 'assistant' %}
{% generation %}[A] {{ m.content | trim }}{{ eos_token }}{% endgeneration %}
    {% else %}
[{{ m.role[0] | upper }}] {{ m.content }} {{ {"len": m.content | length, "é": "<b>"} | tojson }}
    {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}[A] (year {{ strftime_now('%Y') }}){% endif %}"""


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("kwargs", [{}, {"show_system": True, "tools": [{"name": "f", "args": ["x"]}]}])
def test_rich_template_equals_transformers(tmp_path_factory, messages, kwargs):
    from transformers import AutoTokenizer

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tok"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": RICH_TEMPLATE}))
    ours, hf = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    for agp in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=agp, **kwargs) == \
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp, **kwargs)
    with pytest.raises(TinyEngineError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_no_chat_template_is_a_clear_error(tmp_path):
    folder = write_tiny_checkpoint(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_folder(folder)
    assert not tok.has_chat_template
    with pytest.raises(TinyEngineError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_stop_token_ids_from_generation_config(tmp_path):
    tok = Tokenizer.from_folder(write_tiny_checkpoint(tmp_path))  # eos_token_id [2, 0]; eos token <|im_end|> = 2
    assert tok.stop_token_ids == [2, 0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_folder(tmp_path).stop_token_ids == [0, 2]
    (tmp_path / "generation_config.json").unlink()
    assert Tokenizer.from_folder(tmp_path).stop_token_ids == [2]


# ----------------------------------------------------------------------------- sentencepiece


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    """A tokenizer.model trained here (BPE with byte fallback, as Llama 2 / Mistral use)."""
    import io

    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 5), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   # as Llama 2 / Mistral's tokenizer.model: text kept as is
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                              "add_eos_token": False, "legacy": False,
                                                              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                              "chat_template": CHAT_TEMPLATE}))
    return folder


SPM_TEXTS = ["Hello world", "The quick brown fox", "  two leading spaces", "café 東京 😀 (byte fallback)",
             "line one\nline two", "capital of France?", "x"]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_equals_transformers(sentencepiece_folder, text):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_folder(sentencepiece_folder)
    hf = AutoTokenizer.from_pretrained(sentencepiece_folder)
    ids = ours.encode(text)
    assert ids[0] == 1  # BOS, as add_bos_token asks
    assert ids == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.stop_token_ids == [2]


# ----------------------------------------------------------------------------- streaming


def streamed(tok, ids, skip=True):
    decoder = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [decoder.push(i) for i in ids]
    return pieces, "".join(pieces) + decoder.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_reproduces_decode(smol, text):
    ours = smol[0]
    ids = ours.encode(text)
    pieces, joined = streamed(ours, ids)
    assert joined == ours.decode(ids)
    assert "\ufffd" not in "".join(pieces)  # partial UTF-8 is held back, never printed


def test_stream_decoder_holds_back_partial_characters(smol):
    ours = smol[0]
    ids = ours.encode("😀")
    assert len(ids) > 1  # one emoji spans several byte-level tokens
    pieces, joined = streamed(ours, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀"


@given(st.lists(st.integers(0, 49151), max_size=40))
def test_stream_decoder_any_ids(smol, ids):
    ours = smol[0]
    for skip in (True, False):
        assert streamed(ours, ids, skip)[1] == ours.decode(ids, skip_special_tokens=skip)


@given(st.text(max_size=60))
def test_any_text_encodes_like_transformers(smol, text):
    ours, hf, _ = smol
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    # (not always `text`: SmolLM2's vocabulary lacks a few control bytes, which BPE drops)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_stream_decoder_sentencepiece(sentencepiece_folder):
    tok = Tokenizer.from_folder(sentencepiece_folder)
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert streamed(tok, ids)[1] == tok.decode(ids)
