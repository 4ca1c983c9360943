"""megaqwen-generate end to end on the debug model: a native run folder and its HF export give the
same greedy completions (native and hf engines), prompts rendered by `megaqwen.data.prompts`,
malformed lines counted and named, not fatal."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from megaqwen.convert.hf import to_hf, write_native
from megaqwen.generate.cli import main
from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec


@pytest.mark.slow  # ~35 s on 2 cores: the 152K-vocabulary export and transformers load
def test_cli_native_run_folder_and_hf_folder(tmp_path, caplog):
    cfg = get_config("debug")
    model = get_spec(cfg).build(cfg, seed=0)
    with torch.no_grad():
        for p in model.parameters():  # peaky logits: completions are not one repeated token
            p.mul_(8.0) if p.dim() == 2 else None
    run = tmp_path / "run"
    write_native(cfg, model.state_dict(), run / "checkpoints" / "step_00000001", tmp_path)
    (run / "checkpoints" / "latest").write_text("step_00000001")
    hf = to_hf(run, tmp_path / "hf")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"id": 1, "prompt": "The capital of France is"}),
        "{not json",
        json.dumps({"id": 2, "messages": [{"role": "user", "content": "Say hi"}]}),
        json.dumps({"id": 3, "text": "no prompt field"}),
        json.dumps({"id": 4, "prompt": "2 + 2 ="}),
    ]) + "\n")
    common = ["--prompts", str(prompts), "--max-new-tokens", "5", "--greedy", "--batch-size", "2"]
    with caplog.at_level(logging.INFO, logger="megaqwen.generate"):
        assert main(["--checkpoint", str(run), "--output", str(tmp_path / "a.jsonl"), *common]) == 0
    assert f"{prompts}: 2 malformed lines skipped" in caplog.text and "at lines 2, 4" in caplog.text
    assert "tokens/s" in caplog.text
    assert main(["--checkpoint", str(hf), "--output", str(tmp_path / "b.jsonl"), "--engine", "hf",
                 *common]) == 0
    a, b = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("a.jsonl", "b.jsonl"))
    assert [r["id"] for r in a] == [1, 2, 4]
    assert a == b  # the native engine on the run folder == transformers on its export
    for r in a:
        assert len(r["token_ids"]) == 5 or r["finish_reason"] == "stop"
        assert isinstance(r["completion"], str)
    assert a[1]["messages"][0]["content"] == "Say hi"  # input record kept
