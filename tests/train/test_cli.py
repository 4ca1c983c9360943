"""megaqwen-train as a user meets it: one-line errors with suggestions, --help, --version, --check."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from train_cli import MODEL_BUILT, run_cli

from megaqwen import __version__
from megaqwen.train.errors import UsageError
from megaqwen.train.help import field_docs, help_text
from megaqwen.train.overrides import schema_fields
from megaqwen.train.preflight import compose_config, preflight

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("override, suggestion", [
    ("train.stpes=5", "did you mean train.steps?"),
    ("steps=5", "did you mean train.steps?"),
    ("train.lr_min=1e-5", "did you mean train.min_lr?"),
    ("model=qwen2.5-0.5", "did you mean qwen2.5-0.5b?"),
    ("parallel=tp3", "did you mean tp2?"),
    ("train.schedule=cosin", "did you mean cosine?"),
    ("kernels.attention=spda", "did you mean sdpa?"),
    ("parallel.dp_mode=zero", "did you mean zero1?"),
    ("logger.wandb.mode=ofline", "did you mean offline?"),
])
def test_typo_gets_the_right_suggestion_in_one_line(monkeypatch, capsys, tmp_path, override, suggestion):
    code, out, err = run_cli(monkeypatch, capsys, f"train.out_dir={tmp_path}", override)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("megaqwen-train: error: ")
    assert suggestion in err
    assert "To append" not in err and "+train" not in err  # Hydra's advice is wrong for a typed schema


@pytest.mark.parametrize("override, match", [
    ("train.seq_len=8192", "train.seq_len=8192 exceeds model.max_position_embeddings=4096"),
    ("train.steps=abc", "'abc' of type 'str' could not be converted to Integer"),
    ("train=5", "train is a section, set its fields"),
    ("train.eval_every=5", "needs held-out data: set data.valid_path"),
    ("parallel.tp=2", "launch several with launch/torchrun.sh"),
    ("train.device=gpu", "train.device='gpu' is not one of auto | cpu | cuda"),
])
def test_config_errors_name_the_value(tmp_path, override, match):
    with pytest.raises(UsageError, match=match):
        preflight([f"train.out_dir={tmp_path}", override], world_size=1)


def test_missing_data_path_is_reported_before_the_model_with_the_fix(tmp_path):
    with pytest.raises(UsageError) as e:
        preflight([f"train.out_dir={tmp_path}", f"data.path={tmp_path}/shards/web"], world_size=1)
    assert "no shard" in str(e.value) and "megaqwen-data tokenize" in str(e.value)
    (tmp_path / "web.bin").write_bytes(b"")
    (tmp_path / "web.idx").write_bytes(b"")
    with pytest.raises(UsageError, match=r"without extension: data.path=.*/web$"):
        preflight([f"train.out_dir={tmp_path}", f"data.path={tmp_path}/web.idx"], world_size=1)
    with pytest.raises(UsageError, match="raw data, the trainer reads tokenised shards"):
        preflight([f"train.out_dir={tmp_path}", "data.path=corpus.jsonl"], world_size=1)


def test_console_script_prints_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    """The real entry point: no traceback, no Hydra advice, exit status 2; MEGAQWEN_DEBUG=1 raises."""
    args = [f"train.out_dir={tmp_path}", f"data.path={tmp_path}/nope"]
    out = subprocess.run([str(BIN / "megaqwen-train"), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "megaqwen-data tokenize" in out.stderr
    assert "Traceback" not in out.stderr and MODEL_BUILT not in out.stdout + out.stderr
    assert not (tmp_path / ".hydra").exists()  # stopped before Hydra wrote anything
    monkeypatch.setenv("MEGAQWEN_DEBUG", "1")
    with pytest.raises(UsageError, match="no shard"):
        run_cli(monkeypatch, capsys, *args)
    monkeypatch.setenv("MEGAQWEN_DEBUG", "0")  # --debug sets it to 1; monkeypatch undoes that afterwards
    with pytest.raises(UsageError, match="no shard"):
        run_cli(monkeypatch, capsys, "--debug", *args)


def test_help_lists_every_field_with_its_doc_and_default(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0
    flat = " ".join(out.split())
    fields = list(schema_fields())
    assert len(fields) > 60
    for key, owner, f in fields:
        doc = field_docs(owner).get(f.name)
        assert doc, f"{owner.__name__}.{f.name} has no docstring"
        assert doc in flat, key
        assert f"{key}=" in out, key
    assert "train.steps=30" in flat
    assert "pipeline_" not in out  # the data-pipeline YAMLs are not trainer presets
    for group, preset in (("model", "qwen2.5-72b"), ("parallel", "tp4_zero1"), ("kernels", "triton")):
        assert preset in out, group
    assert "MEGAQWEN_DEBUG=1" in out


def test_help_text_shows_the_composed_defaults(tmp_path):
    cfg = compose_config(["model=qwen2.5-7b", "train.allow_changes=[data.path]"])
    text = help_text(cfg, width=105)
    assert "model.hidden_size=3584" in text and "train.allow_changes=[data.path]" in text
    assert max(len(line) for line in text.splitlines()) <= 105


def test_help_section_shows_one_section_with_the_overrides_values(monkeypatch, capsys):
    code, full, _ = run_cli(monkeypatch, capsys, "--help")
    code2, out, _ = run_cli(monkeypatch, capsys, "--help", "parallel")
    assert code == code2 == 0
    assert "parallel.cp_mode=ring" in out and "tp4_zero1" in out  # its fields and its presets
    sections = set(re.findall(r"^  ([a-z_]+)\.[a-z_.]+=", out, flags=re.M))
    assert sections == {"parallel"} and "usage:" not in out
    assert len(out.splitlines()) < len(full.splitlines()) / 3
    code, out, _ = run_cli(monkeypatch, capsys, "model=qwen2.5-7b", "--help", "model")
    assert code == 0 and "model.hidden_size=3584" in out and "model.name=qwen2.5-7b" in out
    assert "values with the overrides model=qwen2.5-7b" in out
    _, out, _ = run_cli(monkeypatch, capsys, "--help", "logger")
    assert "logger.wandb.mode=" in out  # a section includes its subsections
    code, out, _ = run_cli(monkeypatch, capsys, "model=qwen2.5-7b", "--help")  # the full help too
    assert code == 0 and "model.hidden_size=3584" in out and "parallel.tp=1" in out


@pytest.mark.parametrize("args, match", [
    (["--help", "paralel"], "--help paralel: no such section (did you mean parallel?); sections: model,"),
    (["model=qwen2.5-7", "--help"], "did you mean qwen2.5-7b?"),
])
def test_help_with_a_wrong_section_or_override_is_one_line(monkeypatch, capsys, args, match):
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and match in err


@pytest.mark.parametrize("prog", ["megaqwen-train", "megaqwen-data", "megaqwen-eval", "megaqwen-convert"])
def test_version_on_every_cli(prog):
    out = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"megaqwen {__version__}"


def test_check_flag_and_nothing_to_do(monkeypatch, capsys, tmp_path, shard, make_config):
    from megaqwen.train.loop import train

    args = [f"train.out_dir={tmp_path}", f"data.path={shard}", "model.vocab_size=512", "train.seq_len=32",
            "train.global_batch_size=4", "train.steps=2", "logger.wandb.enabled=false"]
    code, _, err = run_cli(monkeypatch, capsys, "--check", *args)
    assert code == 0 and "ready to train" in err
    assert not (tmp_path / "metrics.jsonl").exists()
    train(compose_config(args))
    code, _, err = run_cli(monkeypatch, capsys, *args)  # finished: says so, starts nothing
    assert code == 0 and "nothing to train" in err and "step_00000002" in err


def test_torchrun_launcher_reports_a_bad_key_once_before_starting_ranks(tmp_path):
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc-per-node", "2", f"train.out_dir={tmp_path}",
           "train.stpes=5"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2
    assert run.stderr.count("did you mean train.steps?") == 1, run.stderr
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr


@pytest.mark.distributed
def test_torchrun_ranks_print_a_bad_key_once(tmp_path):
    """Started by torchrun directly (no launcher pre-check): rank 0 alone prints the error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--no-python", str(BIN / "megaqwen-train"), f"train.out_dir={tmp_path}", "train.stpes=5"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert out.count("did you mean train.steps?") == 1, out[-3000:]
    # what remains is torchrun's own ChildFailedError report, not a traceback per rank
    assert "UsageError" not in out and "To append" not in out and out.count("Traceback") <= 1


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_launcher_paths_are_the_callers_and_dp_validation_matches_one_process(tmp_path, shard):
    """launch/torchrun.sh from another folder: relative out_dir/data.path resolve there; the validation
    loss of 2 data-parallel ranks equals one process's (token-weighted sum over the dp group)."""
    import shutil

    from megaqwen.train.loop import train

    (tmp_path / "shards").mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(shard + ext, tmp_path / "shards" / f"docs{ext}")
    common = ["model.vocab_size=512", "train.steps=4", "train.seq_len=32", "train.global_batch_size=4",
              "train.micro_batch_size=1", "train.save_every=0", "train.eval_every=2", "train.eval_iters=2",
              "data.valid_fraction=0.2", "logger.wandb.enabled=false", "data.path=shards/docs"]
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc-per-node", "2", "train.out_dir=run", *common]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert not (ROOT / "run").exists()
    dist_rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train(compose_config([f"train.out_dir={tmp_path / 'single'}", *common[:-1],
                          f"data.path={tmp_path / 'shards' / 'docs'}"]))
    one = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dist_rows if "val_loss" in r] == [2, 4]
    for a, b in zip(dist_rows, one):
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
            assert a["val_tokens"] == b["val_tokens"]
