"""`megaqwen-train ARGS` run in the test's own process (shared by the CLI and fit-check tests)."""

from __future__ import annotations

import sys

from megaqwen.train import main as train_main

MODEL_BUILT = "parameters (this rank's shards)"
"""What the trainer logs once the model exists: a refusal must come before it."""


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`megaqwen-train ARGS` in this process; (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["megaqwen-train", *args])
    code = 0
    try:
        train_main.main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
