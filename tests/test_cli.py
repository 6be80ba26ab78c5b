"""generate.py end to end on the embedded SmolLM2: answers, streams, and refuses bad input in one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def test_chat_answers_paris(smollm2):
    code, out, err = run("--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "30")
    assert code == 0, err
    assert "paris" in out.lower()
    assert "KV cache" in err and "MiB allocated" in err


def test_list_policies():
    code, out, _ = run("--list-policies")
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()]
    from policies import POLICIES

    assert names == list(POLICIES)


LONG_PROMPT = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(120))


@pytest.mark.parametrize("policy_args", [
    ["--policy", "streamingllm", "--budget", "256"],
    ["--policy", "snapkv", "--budget", "256", "--prefill-chunk", "300"],
])
def test_policies_run_on_a_long_prompt(smollm2, policy_args):
    code, out, err = run("--prompt", LONG_PROMPT, "--max-new-tokens", "12", *policy_args)
    assert code == 0, err
    assert out.strip()


BAD = [
    (["--checkpoint", "no-such-model-xyz"], "smollm2-135m"),  # lists the aliases
    (["--checkpoint", "/nonexistent/folder"], "smollm2-135m"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt", "   "], "empty prompt"),
    (["--dtype", "float8"], "dtype"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda:0"], "CUDA"),
    (["--policy", "nosuch"], "unknown policy"),
    (["--policy", "full", "--budget", "10"], "full"),
    (["--policy", "snapkv", "--ratio", "1.5"], "ratio"),
    (["--policy", "snapkv", "--budget", "0"], "budget"),
    (["--policy", "snapkv", "--budget", "64", "--decode-budget", "8"], "decode"),
    (["--policy", "snapkv+knorm", "--budget", "64", "--decode-budget", "8"], "prefill"),
    (["--policy", "full", "--policy-arg", "bogus=1"], "option"),
    (["--policy-arg", "novalue"], "KEY=VALUE"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt-file"),
    (["--top-p", "0"], "top-p"),
    (["--pack-weights", "--dtype", "bfloat16"], "pack-weights"),
    (["--bogus-flag"], "unrecognized"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    if "CUDA" in needle:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    code, out, err = run(*args)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle.lower() in lines[0].lower(), lines[0]


def test_packed_weights_generate_what_plain_weights_do(smollm2):
    """--pack-weights (oneDNN's layout, used for 3-64 rows) on a batch of three prompts: the same greedy text."""
    prompts = [a for p in ("The capital of France is", "Water boils at", "One, two, three,") for a in ("--prompt", p)]
    plain = run(*prompts, "--max-new-tokens", "12", "--quiet")
    packed = run(*prompts, "--max-new-tokens", "12", "--quiet", "--pack-weights")
    assert plain[0] == packed[0] == 0, (plain[2], packed[2])
    assert packed[1] == plain[1] and "--- [2]" in plain[1]


def test_prompt_longer_than_context(smollm2, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("word " * 9000)  # SmolLM2's context is 8192 tokens
    code, _, err = run("--prompt-file", str(long), "--max-new-tokens", "2")
    assert code == 2 and "context" in err and "Traceback" not in err, err
