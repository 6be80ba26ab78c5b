"""Generate text with a KV-cache policy.

    python generate.py --chat --prompt "What is the capital of France?"
    python generate.py --policy snapkv+momentum --budget 256 --decode-budget 128 --prompt-file long.txt
    torchrun --nproc-per-node 3 generate.py --policy momentkv --budget 128 --prompt "..."

Every user error (bad flag, checkpoint, policy, budget, prompt) is one line on stderr and exit
code 2. Tokens stream to stdout as they come (batch of one); statistics go to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage first)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = _Parser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="smollm2-135m",
                   help="alias (smollm2-135m, llama3.1-8b, qwen3-4b, mistral-7b), Hub repo id, local folder or .gguf file")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", action="append", help="read a prompt from a file; repeatable")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the model's chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: on for cuda, off for cpu; see BENCHMARKS.md)")
    p.add_argument("--policy", default="full", help="policy name or prefill+decode (e.g. snapkv+momentum); see --list-policies")
    p.add_argument("--list-policies", action="store_true", help="list the policies and exit")
    p.add_argument("--budget", type=int, help="KV entries kept per kv head per layer after prefill")
    p.add_argument("--ratio", type=float, help="fraction of the prompt to evict at prefill (kvpress's compression_ratio)")
    p.add_argument("--decode-budget", type=int, help="generated entries kept per kv head (decode pool)")
    p.add_argument("--prefill-chunk", type=int, help="prefill the prompt in chunks of N tokens (compressing after each)")
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE", help="policy option, e.g. window=64")
    p.add_argument("--correction", choices=["nc"], help="attach MomentKV's normalization correction to any evicting policy")
    p.add_argument("--pack-weights", action="store_true",
                   help="CPU, float32: a oneDNN-packed copy of the weights, faster decode for batches of 3+ prompts (2x weight memory)")
    p.add_argument("--quiet", action="store_true", help="print only the generated text")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    from tinyengine.errors import TinyEngineError

    prompts = list(args.prompt or [])
    for path in args.prompt_file or []:
        try:
            with open(path, encoding="utf-8") as f:
                prompts.append(f.read())
        except OSError as e:
            raise TinyEngineError(f"cannot read --prompt-file {path}: {e.strerror}") from None
    if not prompts:
        prompts = ["What is the capital of France?"] if args.chat else ["The capital of France is"]
    if any(not p.strip() for p in prompts):
        raise TinyEngineError("empty prompt: give some text with --prompt or --prompt-file")
    return prompts


def policy_options(pairs: list[str]) -> dict:
    from tinyengine.errors import TinyEngineError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TinyEngineError(f"--policy-arg {pair!r}: write KEY=VALUE, e.g. --policy-arg window=64")
        options[key.strip()] = value.strip()
    return options


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import tinyengine
    from policies import describe, make_plan
    from tinyengine import dist as tp
    from tinyengine.engine import Engine, Sampling
    from tinyengine.tokenizer import StreamDecoder
    from tinyengine.tp import parameter_count

    if args.list_policies:
        print(describe())
        return 0
    if args.max_new_tokens < 1:
        raise tinyengine.TinyEngineError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise tinyengine.TinyEngineError(f"--prefill-chunk must be at least 1 (got {args.prefill_chunk})")
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) or (args.top_k is not None and args.top_k < 1):
        raise tinyengine.TinyEngineError("sampling: --temperature >= 0, --top-k >= 1 and --top-p in (0, 1]")
    try:
        plan = make_plan(args.policy, budget=args.budget, ratio=args.ratio, decode_budget=args.decode_budget,
                         options=policy_options(args.policy_arg), correction=args.correction)
    except ValueError as e:
        raise tinyengine.TinyEngineError(str(e)) from None
    prompts = read_prompts(args)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.pack_weights and (device != "cpu" or dtype != "float32"):
        raise tinyengine.TinyEngineError(f"--pack-weights is for float32 on CPU (got {dtype} on {device}); drop it")
    world = tp.init_from_env(device)  # torchrun sets WORLD_SIZE; 1 without it
    talk = not args.quiet and tp.rank() == 0

    t0 = time.perf_counter()
    model, tokenizer = tinyengine.load(args.checkpoint, device=device, dtype=dtype, progress=tp.rank() == 0)
    if talk:
        print(f"[loaded {args.checkpoint} in {time.perf_counter() - t0:.1f}s: {model.args.num_layers} layers, "
              f"{parameter_count(model) / 1e6:.0f}M parameters, {dtype} on {device}"
              + (f", tensor parallel over {world} ranks" if world > 1 else "") + "]", file=sys.stderr)

    if args.pack_weights:
        model.pack_weights()

    texts = prompts
    if args.chat:
        if not tokenizer.has_chat_template:
            raise tinyengine.TinyEngineError(f"{args.checkpoint} has no chat template; drop --chat")
        system = [{"role": "system", "content": args.system}] if args.system else []
        texts = [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}]) for p in prompts]
    ids = [tokenizer.encode(t, add_special_tokens=not args.chat) for t in texts]

    compile_decode = args.compile if args.compile is not None else device.startswith("cuda")
    engine = Engine(model, plan, compile=compile_decode, prefill_chunk=args.prefill_chunk)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    stream = StreamDecoder(tokenizer) if len(ids) == 1 and tp.rank() == 0 else None
    first_token_at = []

    def on_tokens(step_tokens):
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        if stream is not None and step_tokens[0] is not None:
            print(stream.push(step_tokens[0]), end="", flush=True)

    t1 = time.perf_counter()
    outputs = engine.generate(ids, args.max_new_tokens, sampling, stop_ids=tokenizer.stop_token_ids, on_tokens=on_tokens)
    elapsed = time.perf_counter() - t1
    if tp.rank() == 0:
        if stream is not None:
            print(stream.flush())
        else:
            for i, out in enumerate(outputs):
                print(f"--- [{i}]\n{tokenizer.decode(out)}")
    if talk:
        new = sum(len(o) for o in outputs)
        ttft = first_token_at[0] - t1 if first_token_at else float("nan")
        decode_tps = (max(new - len(outputs), 0)) / max(elapsed - ttft, 1e-9)
        print(f"[{plan.name}: prompt {max(map(len, ids))} tokens, {new} new; first token {ttft:.2f}s, "
              f"decode {decode_tps:.1f} tok/s; KV cache {engine.kv_bytes() / 2**20:.2f} MiB allocated"
              + (f" (x{world} ranks)" if world > 1 else "")
              + (f", policy state {engine.state_bytes() / 2**20:.2f} MiB" if engine.state_bytes() else "") + "]",
              file=sys.stderr)
    tp.shutdown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # user errors are one line; anything else is a bug and keeps its traceback
        from tinyengine.errors import TinyEngineError

        if isinstance(e, TinyEngineError):
            print(f"generate.py: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
