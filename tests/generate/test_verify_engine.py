"""`megaqwen-data verify-pairs --engine native`: part 1's verifier pairs sampled by the native
engine (one batched call for all samples of a batch of prompts), on the same tiny random Qwen2 and
chat template as the transformers path's end-to-end test; the counts must add up."""

from __future__ import annotations

import json

from tests.data.test_verifiers import CODE, MATH, save_tiny_hf_model, write_prompts


def test_verify_pairs_with_the_native_engine(tmp_path, capsys):
    from megaqwen.data_pipeline.cli import main

    ckpt = save_tiny_hf_model(tmp_path / "hf")
    prompts = write_prompts(tmp_path / "prompts.jsonl", [MATH, CODE])
    out = tmp_path / "pairs.jsonl"
    rc = main(["verify-pairs", "--prompts", str(prompts), "--checkpoint", str(ckpt), "--output", str(out),
               "--samples", "3", "--max-new-tokens", "8", "--timeout", "2", "--memory-mb", "256",
               "--engine", "native", "--device", "cpu"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["prompts"] == 2 and s["samples"] == 6
    assert s["passed"] + sum(s["failures"].values()) == 6
    assert s["pairs"] == len(out.read_text().splitlines()) == s["prompts_with_pairs"]
