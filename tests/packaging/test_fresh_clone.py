"""A fresh clone works from its own root: no top-level folder of the repository shadows an installed
package of the same name (transformers >= 5.25 imports Hugging Face's `kernels`, and our `kernels/`
folder sits at the top of the clone), whether Python was started with `-c`, `-m` or `-m pytest`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# top-level folders that Python can import from the repository root under their bare name; megaqwen/
# is ours under its own distribution's name, tests/ is never installed
IMPORTABLE = sorted(p.name for p in REPO.iterdir()
                    if (p / "__init__.py").is_file() and p.name not in ("megaqwen", "tests"))


def _run_from_root(args: list[str], extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path  # after sys.path[0] (the repository root), like site-packages
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_layout_has_the_folders_this_guard_is_about():
    assert {"kernels", "data_pipeline", "conf"} <= set(IMPORTABLE), IMPORTABLE


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_transformers_qwen2_imports_from_the_repository_root(tmp_path, how):
    code = ("from transformers import Qwen2Config, Qwen2ForCausalLM\n"
            "m = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, num_key_value_heads=1, vocab_size=64))\n"
            "print('params', sum(p.numel() for p in m.parameters()))\n")
    if how == "-c":
        args = ["-c", code]
    else:  # `python -m X` puts the current folder first on sys.path, as `python -m pytest` does
        (tmp_path / "qwen2_probe.py").write_text(code)
        args = ["-m", "qwen2_probe"]
    r = _run_from_root(args, extra_path=str(tmp_path) if how == "-m" else None)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "params" in r.stdout


@pytest.mark.parametrize("name", IMPORTABLE)
def test_an_installed_package_wins_over_the_folder_of_the_same_name(tmp_path, name):
    """Stand in for a PyPI package named like each top-level folder: from the repository root,
    `import NAME` must load the installed one, not the clone's folder."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("INSTALLED = True\n")
    r = _run_from_root(["-c", f"import {name}; print({name}.__file__, getattr({name}, 'INSTALLED', False))"],
                       extra_path=str(site))
    assert r.returncode == 0, r.stderr[-3000:]
    where, installed = r.stdout.split()
    assert installed == "True" and Path(where).is_relative_to(site), (
        f"`import {name}` from the repository root loaded {where}: the top-level folder {name}/ shadows "
        f"an installed package named {name!r} (make its __init__.py defer, see megaqwen/_toplevel.py)")


@pytest.mark.parametrize("name", IMPORTABLE)
def test_the_installed_subpackage_is_still_ours(name):
    r = _run_from_root(["-c", f"import megaqwen.{name} as m; print(m.__file__)"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()).resolve() == (REPO / name / "__init__.py").resolve() or \
        "site-packages" in r.stdout  # a non-editable install copies the files
