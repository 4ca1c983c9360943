"""Verifiers for offline-RL pairs: maths answer equivalence, the code sandbox, `verify-pairs`."""

from __future__ import annotations

import time

import pytest

from megaqwen.data_pipeline.verify.math_answer import equivalent, extract_answer, normalise
from megaqwen.data_pipeline.verify.sandbox import SandboxConfig, network_isolation, run_python

# ---- maths -------------------------------------------------------------------------------------------

EXTRACTED = [
    ("so the area is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3}, corrected: \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
    ("The answer is 42.", "42"),
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
    ("\\sqrt[3]{8}", "2"),
]

NOT_EQUIVALENT = [
    ("1/2", "0.51"), ("3", "-3"), ("(1,2)", "(2,1)"), ("1,2", "12"), ("x", "y"), ("\\sqrt{2}", "1.414"),
    ("", "0"), (None, "0"), ("1/0", "0"), ("2x", "2y"), ("9^9^9", "1"), ("__import__('os')", "1"),
]


@pytest.mark.parametrize("text,answer", EXTRACTED)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent_answers(a, b):
    assert equivalent(str(a), b) and equivalent(str(b), a), (normalise(str(a)), normalise(str(b)))


@pytest.mark.parametrize("a,b", NOT_EQUIVALENT)
def test_non_equivalent_answers(a, b):
    assert not equivalent(a, b)


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
    if network_isolation() == "audit-hook":
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
