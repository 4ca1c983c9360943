"""megaqwen-eval loss: the documented mean next-token loss, same for native and HF checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megaqwen.convert.hf import to_hf
from megaqwen.eval import main as eval_main
from megaqwen.models import build_model, get_config
from megaqwen.train.checkpoint import save_checkpoint


def make_checkpoint(tmp_path: Path):
    cfg = get_config("debug")  # the real 151,936-row vocabulary, so text rows can be scored
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model, None,
                    {"consumed_samples": 0, "model_config": cfg.to_dict()})
    return model


def reference_loss(model, docs: list[list[int]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            x = torch.tensor(ids)[None]
            logits = model(x[:, :-1])
            total += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return total / count


def test_loss_on_token_ids_and_text(tmp_path, capsys):
    model = make_checkpoint(tmp_path)
    docs = [[5, 900, 151_000, 42, 7], [11, 12, 13], [99]]  # the 1-token doc predicts nothing
    data = tmp_path / "ids.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": d}) for d in docs) + "\n{broken\n")
    assert eval_main(["loss", "--checkpoint", str(tmp_path / "run"), "--data", str(data)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 4 + 2 and out["documents"] == 3 and out["malformed"] == 1
    assert abs(out["loss"] - reference_loss(model, docs[:2])) <= 1e-5

    from megaqwen.tokenizer import load_tokenizer

    texts = ["The quick brown fox jumps over the lazy dog.", "量子计算机 uses qubits. def f(x): return x"]
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    assert eval_main(["loss", "--checkpoint", str(tmp_path / "run"), "--data",
                      str(tmp_path / "text.jsonl"), "--max-len", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = load_tokenizer()
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert ids[0][0] != 151643  # no BOS/EOD added
    assert out["tokens"] == sum(len(i) - 1 for i in ids)
    # windows of 4 predicted tokens see less context than whole documents: same count, its own value
    assert out["loss"] > 0


def test_native_and_hf_checkpoints_agree(tmp_path):
    make_checkpoint(tmp_path)
    to_hf(tmp_path / "run", tmp_path / "hf", tokenizer=False)
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"input_ids": list(range(100, 160))}) + "\n")
    exe = Path(sys.executable).with_name("megaqwen-eval")
    results = []
    for ckpt in (tmp_path / "run", tmp_path / "hf"):
        out = subprocess.run([str(exe), "loss", "--checkpoint", str(ckpt), "--data", str(data)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results.append(json.loads(out.stdout))
    assert results[0]["tokens"] == results[1]["tokens"] == 59
    assert abs(results[0]["loss"] - results[1]["loss"]) <= 1e-6


def test_errors_are_named(tmp_path, capsys):
    make_checkpoint(tmp_path)
    assert eval_main(["loss", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 999_999]}) + "\n")
    assert eval_main(["loss", "--checkpoint", str(tmp_path / "run"), "--data", str(data)]) == 2
    assert "token id 999999 outside the model's vocabulary" in capsys.readouterr().err
    assert eval_main(["loss", "--checkpoint", str(tmp_path / "nowhere"), "--data", str(data)]) == 2
    assert "no megaqwen checkpoint" in capsys.readouterr().err


def test_read_documents_reports_bad_rows_once_and_stops_at_the_limit(tmp_path, caplog):
    import logging

    from megaqwen.eval import read_documents

    data = tmp_path / "d.jsonl"
    rows = [json.dumps({"input_ids": [i, i + 1]}) for i in range(4)]
    data.write_text("\n".join(rows[:2] + ["{broken", json.dumps({"body": 1}), "[1,"] + rows[2:]) + "\n")
    with caplog.at_level(logging.WARNING, logger="megaqwen.eval"):
        docs, malformed = read_documents(data, lambda: None)
    assert docs == [[0, 1], [1, 2], [2, 3], [3, 4]] and malformed == 3
    assert caplog.messages == [f"{data}: 3 malformed rows skipped (invalid_json 2, no_text_or_input_ids 1) "
                               "at rows 3, 4, 5"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megaqwen.eval"):
        assert read_documents(data, lambda: None, limit=2) == ([[0, 1], [1, 2]], 0)  # reads no further
    assert caplog.messages == []
