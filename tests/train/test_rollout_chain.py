"""conf/stage/debug-grpo.yaml: SFT -> DPO -> GRPO on the debug model and the shipped toy task, from one
`megaqwen-stages` command (the shipped chat sets tokenised by the run, each stage resuming the last)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_debug_chain_sft_dpo_grpo_runs_from_one_command(tmp_path):
    from megaqwen.train.stages import main

    out = tmp_path / "run"
    assert main(["debug-grpo", f"train.out_dir={out}", "train.device=cpu", "train.lock_timeout_min=1"]) == 0
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [(s["name"], s["status"]) for s in stages] == [("sft", "done"), ("dpo", "done"), ("grpo", "done")]
    assert stages[1]["resumed_from"] == stages[0]["final_checkpoint"]
    assert stages[2]["resumed_from"] == stages[1]["final_checkpoint"]
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == list(range(1, 6))
    assert "dpo/loss" in rows[3]
    for s in (4, 5):  # the GRPO stage: its prompt stream starts at the first prompt
        assert 0 <= rows[s]["rollout/reward_mean"] <= 1 and rows[s]["rollout/prompts"] == 2
    assert rows[4]["consumed_samples"] == 16
    first = [json.loads(x) for x in (out / "rollouts" / "step_0000004.jsonl").read_text().splitlines()]
    assert [x["prompt_line"] for x in first[::8]] == [1, 2]
    assert (out / "reward.png").is_file() and (out / "data" / "arithmetic-dpo.idx").is_file()
