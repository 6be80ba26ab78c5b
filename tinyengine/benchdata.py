"""Offline, seeded tasks for bench.py: real prose, RULER-style retrieval, LongGenBench-style generation.

Everything here is generated on the machine, from the Python standard library and a seed, so
every machine builds the same samples without a network:

  prose      English paragraphs of Python's own documentation (`pydoc_data.topics`, installed with
             every CPython), code blocks and grammar rules dropped, topics in sorted order.
  RULER      (Hsieh et al., 2024, "RULER: What's the real context size of your long-context LMs?")
             niah_single, niah_multikey, niah_multivalue and vt (variable tracking), with RULER's
             templates and its `string_match_all` score (fraction of references found in the answer).
  longgen    LongGenBench-style (Liu et al., 2024): one prompt whose many numbered sub-questions
             are answered in a single long output, scored per sub-question.

The tokenizer is any object with `encode(text, add_special_tokens)` and `apply_chat_template`
(tinyengine.tokenizer.Tokenizer).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------- prose


def prose_text() -> str:
    """The English prose of pydoc_data.topics, deterministically concatenated (~300K characters)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.split("\n")
            if any(line.startswith(" ") for line in lines):  # code, grammar and indented examples
                continue
            if len(lines) == 2 and set(lines[1]) <= set("*=-~^"):  # a heading and its underline
                continue
            text = " ".join(line.strip() for line in lines)
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) < 80 or letters < 0.85 * len(text):  # keep sentences, not tables or lists
                continue
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


def prose_tokens(tokenizer) -> list[int]:
    return tokenizer.encode(prose_text(), add_special_tokens=False)


def fidelity_samples(tokenizer, n: int, context: int, continuation: int, seed: int = 0):
    """n non-overlapping (context_ids, continuation_ids) windows of the prose, at seeded offsets."""
    tokens = prose_tokens(tokenizer)
    span = context + continuation
    slots = len(tokens) // span
    if slots < n:
        raise ValueError(f"the prose holds {slots} windows of {span} tokens, fewer than the {n} asked; "
                         "use fewer samples or shorter contexts")
    chosen = sorted(random.Random(seed).sample(range(slots), n))
    return [(tokens[i * span: i * span + context], tokens[i * span + context: (i + 1) * span]) for i in chosen]


# ----------------------------------------------------------------------------- RULER

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt")

# RULER's templates (scripts/data/synthetic/constants.py), with its answer prefixes.
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
WORDS = ("apple banana cherry dragon eagle falcon garden harbor island jungle kettle lemon meadow needle "
         "orange pepper quartz river saddle tiger umbrella violet walnut yellow zebra anchor basket candle "
         "desert ember forest glacier hammer igloo jacket kitten ladder marble nectar oyster pillow quiver "
         "rocket silver timber velvet window").split()


@dataclass
class RulerSample:
    task: str
    length: int  # target prompt length in tokens
    context: str  # the haystack with its needles (and RULER's intro)
    question: str
    answer_prefix: str
    references: list[str]
    max_new_tokens: int = 24
    meta: dict = field(default_factory=dict)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"


def _value(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _fill(tokenizer, length: int, overhead: int, haystack: list[str], needles: list[str], rng, depths=None) -> str:
    """Haystack sentences with the needles at (seeded) depths in [0, 1], about `length - overhead` tokens."""
    depths = depths or sorted(rng.random() for _ in needles)

    def build(n_sentences: int) -> str:
        sentences = [haystack[i % len(haystack)] for i in range(n_sentences)]
        for needle, d in sorted(zip(needles, depths), key=lambda t: -t[1]):  # deepest first keeps indices valid
            sentences.insert(int(round(d * len(sentences))), needle)
        return " ".join(sentences)

    def fits(n: int) -> bool:
        return len(tokenizer.encode(build(n), add_special_tokens=False)) <= length - overhead

    lo, hi = 1, 8
    while fits(hi):  # grow until it overshoots, then bisect for the largest haystack that fits
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return build(lo)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]


def ruler_sample(task: str, tokenizer, length: int, seed: int, digits: int = 7, needles: int = 4,
                 hops: int = 3) -> RulerSample:
    """One RULER-style sample whose chat prompt is about `length` tokens.

    niah_single      one needle in the prose; the question names its key.
    niah_multikey    `needles` needles with different keys; the question names one.
    niah_multivalue  `needles` values for the same key; all must be returned.
    vt               a chain of `hops` assignments VAR X1 = v, VAR X2 = VAR X1, ... in RULER's noise;
                     every variable of the chain must be returned.

    Sized for SmolLM2-135M so that the full cache scores meaningfully (calibrated at 1K and 4K):
    RULER's templates and 7-digit values, but vt has 3 hops (RULER: 4) and its answer prefix
    ends with a list item "\n- VAR" (RULER: "they are: "), without which the 135M model
    continues the noise instead of answering (0% with the full cache).
    """
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(RULER_TASKS)}")
    rng = random.Random(f"{task}-{length}-{seed}")
    overhead = 120  # chat template, question and answer prefix, in tokens (generous)
    prose = _sentences(prose_text())
    start = rng.randrange(len(prose))
    haystack = prose[start:] + prose[:start]
    if task == "vt":
        value = _value(rng, 5)
        names = []
        while len(names) < hops:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops)]
        depths = sorted(rng.random() for _ in chain)
        context = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                   + _fill(tokenizer, length, overhead, [NOISE], chain, rng, depths))
        return RulerSample(task, length, context,
                           f"Question: Find all variables that are assigned the value {value} in the text above.",
                           f"Answer: According to the chain(s) of variable assignment in the text above, {hops} variables "
                           f"are assigned the value {value}, they are:\n- VAR",
                           names, max_new_tokens=32, meta={"value": value})
    keys = []
    while len(keys) < (needles if task == "niah_multikey" else 1):
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    if task == "niah_multivalue":
        values = list(dict.fromkeys(_value(rng, digits) for _ in range(needles)))
        texts = [NEEDLE.format(key=keys[0], value=v) for v in values]
        refs = values
    else:
        values = [_value(rng, digits) for _ in keys]
        texts = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        refs = [values[0]]
    context = NIAH_INTRO + _fill(tokenizer, length, overhead, haystack, texts, rng)
    query = keys[0]
    if task == "niah_multivalue":
        question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f"The special magic numbers for {query} mentioned in the provided text are"
        new = 48
    else:
        question = f"What is the special magic number for {query} mentioned in the provided text?"
        prefix = f"The special magic number for {query} mentioned in the provided text is"
        new = 16
    return RulerSample(task, length, context, question, prefix, refs, max_new_tokens=new, meta={"key": query})


def ruler_samples(tasks, lengths, n: int, tokenizer, seed: int = 0) -> list[RulerSample]:
    return [ruler_sample(t, tokenizer, L, seed * 1000 + i) for L in lengths for t in tasks for i in range(n)]


def ruler_score(prediction: str, references: list[str]) -> float:
    """RULER's string_match_all: the fraction of references that occur in the prediction (case-insensitive)."""
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def chat_segments(tokenizer, sample: RulerSample, question_aware: bool = False):
    """(context_ids, question_ids) as kvpress's pipeline splits a chat prompt.

    The user turn is context + question; the context segment ends where the question starts, so
    compressing the context cannot see the question (kvpress's query-agnostic setting). The
    question segment carries the end of the user turn, the assistant header and RULER's answer
    prefix. With question_aware the question is also appended to the context (as in
    SnapKV's original setting), so prefill-time scoring sees it.
    """
    separator = "\u241e" * 4  # a marker that cannot occur in the samples
    question = ("\n" + sample.question) if question_aware else ""
    if tokenizer.has_chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": sample.context + question + separator}])
        context, suffix = rendered.split(separator)
    else:
        context, suffix = sample.context + question, "\n"
    q = "" if question_aware else "\n" + sample.question
    context_ids = tokenizer.encode(context, add_special_tokens=not tokenizer.has_chat_template)
    question_ids = tokenizer.encode(q + suffix + sample.answer_prefix, add_special_tokens=False)
    return context_ids, question_ids


# ----------------------------------------------------------------------------- long generation

LONGGEN_ITEMS = ("lamp", "clock", "violin", "kettle", "compass", "ladder", "helmet", "anchor", "barrel", "candle",
                 "mirror", "saddle", "teapot", "basket", "bucket", "rocket", "magnet", "trumpet", "shovel", "jacket",
                 "pillow", "wallet", "hammer", "bottle", "camera", "guitar", "tripod", "pencil", "feather", "lantern")
LONGGEN_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden")
LONGGEN_OWNERS = ("Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena",
                  "Marco", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tariq")
LONGGEN_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Riga", "Seoul", "Tunis", "Accra",
                  "Bogota", "Cairo", "Denver", "Geneva", "Havana", "Jakarta", "Kyoto", "Madrid", "Perth")
LONGGEN_FIELDS = ("item", "color", "owner", "city", "code")


@dataclass
class LongGenSample:
    prompt: str
    references: list[dict]  # per sub-question: {"index", "item", "color", "owner", "city", "code"}


def longgen_sample(n_questions: int, seed: int = 0) -> LongGenSample:
    """A catalogue of `n_questions` records and one instruction with a numbered sub-question per record.

    Each answer restates one record (~30 tokens), so 64 sub-questions make an output of ~2K tokens:
    what LongGenBench measures (many answers in one long output, each needing the right part of
    the prompt, in order) at a size a 135M model completes. Scored by `longgen_score`.
    """
    rng = random.Random(f"longgen-{seed}")
    refs = [{"index": i, "item": rng.choice(LONGGEN_ITEMS), "color": rng.choice(LONGGEN_COLORS),
             "owner": rng.choice(LONGGEN_OWNERS), "city": rng.choice(LONGGEN_CITIES), "code": str(rng.randrange(1000, 10000))}
            for i in range(1, n_questions + 1)]
    catalogue = "\n".join(f"Record {r['index']}: a {r['color']} {r['item']} owned by {r['owner']} from {r['city']}, "
                          f"with code {r['code']}." for r in refs)
    prompt = (f"Here is a catalogue of {n_questions} records.\n\n{catalogue}\n\n"
              f"Answer the following {n_questions} questions in order. For each number i from 1 to {n_questions}, write "
              "\"Record i:\" followed by the full description of that record: its item, color, owner, city and code.\n"
              + "\n".join(f"Question {r['index']}: describe record {r['index']}." for r in refs))
    return LongGenSample(prompt, refs)


def longgen_score(text: str, references: list[dict]) -> list[float]:
    """Per sub-question: the fraction of the record's five fields (item, color, owner, city, code)
    named in the output's section "Record i:" (up to the next "Record j:"); 0 when it is missing."""
    starts = {int(m.group(1)): m.start() for m in reversed(list(re.finditer(r"Record\s+(\d+)\s*:", text)))}
    positions = sorted(starts.values())
    scores = []
    for r in references:
        if r["index"] not in starts:
            scores.append(0.0)
            continue
        begin = starts[r["index"]]
        end = next((p for p in positions if p > begin), len(text))
        section = text[begin:end].lower()
        scores.append(sum(r[f].lower() in section for f in LONGGEN_FIELDS) / len(LONGGEN_FIELDS))
    return scores
