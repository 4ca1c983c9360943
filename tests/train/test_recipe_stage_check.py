"""`megaqwen-train` refuses a data recipe planned for another context stage, and a stage's LR
schedule restarts at `train.schedule_start`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from megaqwen.train.config import TrainConfig
from megaqwen.train.errors import UsageError
from megaqwen.train.optim import lr_at
from megaqwen.train.preflight import preflight


def test_recipe_of_another_stage_is_refused_before_work(tmp_path):
    recipe = tmp_path / "stage-32k.json"
    recipe.write_text(json.dumps({"sources": []}))
    (tmp_path / "stage-32k.meta.json").write_text(json.dumps({"seq_length": 32768, "rope_base": 1e6}))
    with pytest.raises(UsageError, match=r"made for seq_length 32768 \(the stage trains at 128\)"):
        preflight([f"train.out_dir={tmp_path}/run", f"data.path={recipe}", "train.seq_len=128"], world_size=1)


def test_schedule_start_restarts_warmup_and_decay():
    base = TrainConfig(steps=10, lr=1.0, min_lr=0.0, warmup_steps=2, schedule="cosine")
    stage = replace(base, steps=20, schedule_start=10)
    assert [lr_at(10 + i, stage) for i in range(10)] == [lr_at(i, base) for i in range(10)]
    assert lr_at(10, stage) == 0.5 and lr_at(19, stage) == pytest.approx(0.0)
