"""Verifiers for offline-RL pairs: maths answer equivalence, the code sandbox, `verify-pairs`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from megaqwen.rewards.math_answer import equivalent, extract_answer, normalise
from megaqwen.rewards.sandbox import SandboxConfig, isolation, run_python

# ---- maths -------------------------------------------------------------------------------------------

EXTRACTED = [
    ("so the area is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3}, corrected: \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
    ("The answer is 42.", "42"),
    ("so the answer is 2.5.\nDone", "2.5"),
    ("Answer: x = 3", "x = 3"),
    ("we had 3 boxes and 1,000 apples", "1,000"),
    ("it costs -2.5 dollars", "-2.5"),
    ("no digits here", None),
]

EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac12", "1/2"), ("\\tfrac{3}{4}", "0.75"), ("-\\frac{1}{4}", "-0.25"),
    ("50\\%", "0.5"), ("50%", "50"), ("1,000", "1000"), ("1,234,567", "1234567"), ("$3$", "3"),
    (" 7 ", "7.0"), ("x = 3", "3"), ("10^\\circ", "10"), ("\\text{5 cm}", "5cm"), ("0.333333333", "1/3"),
    ("(1, 2)", "(1,2)"), ("\\left( 1, \\frac{1}{2} \\right)", "(1, 0.5)"), ("3.", "3"), (3, "3"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\frac{\\pi}{2}", "\\pi/2"), ("x^2+2x+1", "(x+1)^2"),
    ("\\sqrt[3]{8}", "2"), ("(x+y+1)^{2}", "x^2+y^2+2xy+2x+2y+1"), ("ab", "ba"),
]

NOT_EQUIVALENT = [
    ("1/2", "0.51"), ("3", "-3"), ("(1,2)", "(2,1)"), ("1,2", "12"), ("x", "y"), ("\\sqrt{2}", "1.414"),
    ("", "0"), (None, "0"), ("1/0", "0"), ("2x", "2y"), ("9^9^9", "1"), ("__import__('os')", "1"),
    ("x.evalf", "x"), ("(x+y+1)^{99}", "(x+y)^{99}"),
]


@pytest.mark.parametrize("text,answer", EXTRACTED)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent_answers(a, b):
    assert equivalent(str(a), b) and equivalent(str(b), a), (normalise(str(a)), normalise(str(b)))


@pytest.mark.parametrize("a,b", NOT_EQUIVALENT)
def test_non_equivalent_answers(a, b):
    start = time.monotonic()
    assert not equivalent(a, b)
    assert time.monotonic() - start < 5, "symbolic checks evaluate at points, never simplify()"


def test_numeric_equivalence_without_sympy(monkeypatch):
    """Without sympy, numbers, fractions and percentages still compare; symbolic forms do not."""
    import builtins

    real_import = builtins.__import__

    def no_sympy(name, *args, **kwargs):
        if name.startswith("sympy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sympy)
    assert equivalent("\\frac{1}{2}", "50%") and equivalent("1,000", "1000.0")
    assert not equivalent("2\\sqrt{2}", "\\sqrt{8}")


# ---- the code sandbox --------------------------------------------------------------------------------

LIMITS = SandboxConfig(timeout_s=2.0, memory_mb=256)
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_correct_solution_passes():
    r = run_python(SOLUTION, TESTS, LIMITS)
    assert r.passed and r.reason == "passed", r


def test_wrong_solution_fails():
    r = run_python("def add(a, b):\n    return a - b\n", TESTS, LIMITS)
    assert not r.passed and r.reason == "wrong_answer" and "AssertionError" in r.detail


def test_exception_and_early_exit_fail():
    assert run_python("def add(a, b):\n    return a +\n", TESTS, LIMITS).reason == "exception"  # syntax
    assert run_python("import sys\nsys.exit(0)\n", TESTS, LIMITS).reason == "exception"
    # os._exit skips every handler: no result reaches the parent, so it cannot pass either
    assert run_python("import os\nos._exit(0)\n", TESTS, LIMITS).reason == "no_result"


@pytest.mark.parametrize("program", [
    "while True:\n    pass\n",
    "import time\ntime.sleep(60)\n",
    "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nwhile True:\n    pass\n",
], ids=["spin", "sleep", "fork-and-spin"])
def test_infinite_loop_is_killed_within_its_limit(program):
    start = time.monotonic()
    r = run_python(program, TESTS, LIMITS)
    took = time.monotonic() - start
    assert r.reason == "timeout" and not r.passed, r
    assert LIMITS.timeout_s * 0.9 <= took < LIMITS.timeout_s + 1.5, took


@pytest.mark.parametrize("leave_group", [False, True], ids=["fork", "fork-and-setsid"])
def test_forked_helpers_die_with_the_check(tmp_path, leave_group):
    """A forked child does not outlive the timeout: the process group is killed, and the PID namespace
    (where the kernel allows one) takes a child that left the group with setsid() too."""
    if leave_group and "pidns" not in isolation():
        pytest.skip("no PID namespace on this machine: a setsid() child can outlive the check")
    pid_file = tmp_path / "pid"
    program = ("import os, time\nif os.fork() == 0:\n"
               f"    {'os.setsid()' if leave_group else 'pass'}\n"
               # /proc is the host's: /proc/self names the pid outside the sandbox's PID namespace
               f"    open({str(pid_file)!r}, 'w').write(os.readlink('/proc/self'))\n"
               "    time.sleep(60)\nwhile True:\n    pass\n")
    assert run_python(program, TESTS, LIMITS).reason == "timeout"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):  # killed, not yet reaped
            return
        time.sleep(0.1)
    raise AssertionError(f"forked child {pid} still running (state {state})")


def test_cpu_limit_stops_a_multithreaded_spinner():
    """Four spinning threads use CPU time faster than wall time: RLIMIT_CPU ends them (a timeout)."""
    program = ("import threading\n"
               "def spin():\n    while True:\n        pass\n"
               "for _ in range(4):\n    threading.Thread(target=spin, daemon=True).start()\n"
               "import time\ntime.sleep(60)\n")
    r = run_python(program, TESTS, SandboxConfig(timeout_s=30, memory_mb=256, cpu_seconds=1))
    assert r.reason == "timeout" and "CPU seconds" in r.detail, r
    assert r.seconds < 15


@pytest.mark.parametrize("program", [
    "x = bytearray(1 << 40)\n",
    "xs = []\nwhile True:\n    xs.append(bytearray(1 << 20))\n",
], ids=["one-shot", "gradual"])
def test_memory_bomb_is_stopped(program):
    start = time.monotonic()
    r = run_python(program, TESTS, LIMITS)
    assert r.reason == "memory" and not r.passed, r
    assert time.monotonic() - start < LIMITS.timeout_s, "stopped by the memory limit, not the clock"


def test_socket_use_fails():
    """The audit hook refuses lookups and connects whatever isolation the kernel allowed."""
    for program in ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
                    "import socket\nsocket.socket().connect(('127.0.0.1', 22))\n"):
        r = run_python(program, TESTS, LIMITS)
        assert r.reason == "exception" and "no network" in r.detail, r


def test_network_namespace_holds_without_the_audit_hook():
    """A subprocess has no audit hook; where a network namespace applied, it still has no network."""
    if "netns" not in isolation():
        pytest.skip("no network namespace on this machine: isolation is the audit hook only")
    program = (
        "import subprocess, sys\n"
        "code = 'import socket; socket.socket().connect((\"127.0.0.1\", 22))'\n"
        "out = subprocess.run([sys.executable, '-I', '-c', code], capture_output=True, text=True)\n"
    )
    tests = ("assert out.returncode != 0, out.stderr\n"
             "assert 'unreachable' in out.stderr or 'refused' in out.stderr, out.stderr\n")
    r = run_python(program, tests, LIMITS)
    assert r.passed, r


def test_sandbox_limits_are_validated():
    with pytest.raises(ValueError, match="memory_mb=8"):
        SandboxConfig(memory_mb=8)


# ---- verify-pairs ------------------------------------------------------------------------------------

MATH = {"prompt": "What is half of one?", "answer": "\\frac{1}{2}"}
CODE = {"messages": [{"role": "user", "content": "Write add(a, b)."}], "tests": ["assert add(1, 2) == 3"]}
CANNED = {  # prompt text -> the responses a model "sampled"
    "What is half of one?": ["It is \\boxed{0.5}.", "The answer is 2.", "No idea."],
    "Write add(a, b).": ["```python\ndef add(a, b):\n    return a + b\n```",
                         "```python\ndef add(a, b):\n    while True:\n        pass\n```",
                         "```python\nx = bytearray(1 << 40)\n```"],
    "Always right: 2+2?": ["\\boxed{4}", "4", "so the answer is 4."],
    "Always wrong: 2+2?": ["\\boxed{5}", "5", "so the answer is 3."],
}


def canned(tasks, n):
    return [CANNED[t.chat[-1]["content"]][:n] for t in tasks]


def write_prompts(path, records):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_cli(tmp_path, records, *extra, generate=canned):
    import json

    from megaqwen.data_pipeline.cli import build_parser
    from megaqwen.data_pipeline.verify.cli import run

    prompts = write_prompts(tmp_path / "prompts.jsonl", records)
    out = tmp_path / "pairs.jsonl"
    args = build_parser().parse_args(["verify-pairs", "--prompts", str(prompts), "--checkpoint", "canned",
                                      "--output", str(out), "--samples", "3", "--timeout", "2",
                                      "--memory-mb", "256", *extra])
    rc = run(args, generate=generate)
    pairs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text()) if rc == 0 else None
    return rc, pairs, summary


def test_pairs_only_where_one_passes_and_one_fails(tmp_path):
    records = [MATH, CODE, {"prompt": "Always right: 2+2?", "answer": 4}, {"prompt": "Always wrong: 2+2?",
                                                                           "answer": "4"}]
    rc, pairs, s = run_cli(tmp_path, records)
    assert rc == 0
    assert [p.get("prompt") or p["messages"][-1]["content"] for p in pairs] == [MATH["prompt"],
                                                                                 "Write add(a, b)."]
    math_pair, code_pair = pairs
    assert math_pair["chosen"] == "It is \\boxed{0.5}." and math_pair["rejected"] == "The answer is 2."
    assert math_pair["source"] == {"verifier": "math", "line": 1, "rejected_reason": "wrong_answer",
                                  "checkpoint": "canned"}
    assert code_pair["messages"] == CODE["messages"] and "prompt" not in code_pair  # the input's form is kept
    assert "return a + b" in code_pair["chosen"] and code_pair["source"]["rejected_reason"] == "timeout"
    assert {"chosen", "rejected"} <= set(code_pair)
    assert s["prompts"] == 4 and s["samples"] == 12 and s["pairs"] == 2 and s["prompts_with_pairs"] == 2
    assert s["passed"] == 1 + 1 + 3 + 0 and s["prompts_all_passed"] == 1 and s["prompts_all_failed"] == 1
    # the infinite loop and the memory bomb are failures with their reasons
    assert s["failures"] == {"wrong_answer": 4, "no_answer": 1, "timeout": 1, "memory": 1}
    assert sum(s["failures"].values()) + s["passed"] == s["samples"]
    assert s["isolation"].endswith("audit-hook")


def test_progress_lines_give_rate_and_eta(tmp_path, caplog):
    with caplog.at_level("INFO", logger="megaqwen.verify_pairs"):
        rc, _, _ = run_cli(tmp_path, [MATH] * 3, "--batch-prompts", "1", "--log-every", "0")
    lines = [r.getMessage() for r in caplog.records if r.name == "megaqwen.verify_pairs"]
    assert rc == 0 and len(lines) == 3
    assert lines[0].startswith("1/3 prompts") and "prompts/s, ETA" in lines[0]
    assert lines[-1].startswith("3/3 prompts") and lines[-1].endswith("ETA 0 s")


def test_pairs_per_prompt_and_bad_input(tmp_path):
    rc, pairs, _ = run_cli(tmp_path, [MATH], "--pairs-per-prompt", "5")
    assert rc == 0 and len(pairs) == 1  # one passing response: one pair at most
    rc, _, _ = run_cli(tmp_path, [{"prompt": "x", "answer": "1", "tests": "assert 1"}])
    assert rc == 2
    rc, _, _ = run_cli(tmp_path, [MATH], "--samples", "1")
    assert rc == 2


def test_extract_code_takes_the_last_fenced_block():
    from megaqwen.rewards.code import extract_code

    assert extract_code("first\n```python\na = 1\n```\nthen\n```\nb = 2\n```") == "b = 2\n"
    assert extract_code("def f(): pass") == "def f(): pass"


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tiny_hf_model(folder):
    """A random 2-layer Qwen2 over the 300-id test tokenizer, given a chat template: a second to build."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tests.data.tiny_tokenizer import make_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(folder))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_verify_pairs_end_to_end_with_hf_generate(tmp_path, capsys):
    """The real command: a tiny random Qwen2 sampled with transformers `generate` through its chat
    template. The text is gibberish, so pairs may be zero; the counts must add up."""
    import json

    from megaqwen.data_pipeline.cli import main

    ckpt = save_tiny_hf_model(tmp_path / "hf")
    prompts = write_prompts(tmp_path / "prompts.jsonl", [MATH, CODE])
    out = tmp_path / "pairs.jsonl"
    rc = main(["verify-pairs", "--prompts", str(prompts), "--checkpoint", str(ckpt), "--output", str(out),
               "--samples", "2", "--max-new-tokens", "8", "--timeout", "2", "--memory-mb", "256"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["prompts"] == 2 and s["samples"] == 4
    assert s["passed"] + sum(s["failures"].values()) == 4
    assert s["pairs"] == len(out.read_text().splitlines()) == s["prompts_with_pairs"]
    assert s["prompts_with_pairs"] + s["prompts_all_passed"] + s["prompts_all_failed"] == 2
