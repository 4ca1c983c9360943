"""The online GRPO loop (megaqwen/train/rollout.py) through the trainer: rollouts of the policy on the
shipped arithmetic prompts, scored, turned into rows, trained on; saved rollouts, rollout/* metrics,
the reward curve; resume continues the prompt stream; bad configs refused with the fix."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.train import metric_names as mn
from megaqwen.train.loop import train
from megaqwen.train.rollout import make_rows, spread

# full vocabulary (the prompts are Qwen chat tokens); rows: a 19-token prompt + 3 new tokens
GRPO = ("model.vocab_size=151936", "train.objective=grpo", "rollout.prompts=arithmetic", "grpo.group_size=4",
        "grpo.max_new_tokens=3", "train.seq_len=24", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.warmup_steps=0", "train.schedule=constant", "train.lr=1e-3",
        "grpo.rewards=[{name:math},{name:'rollout_rewards:parity',weight:0.5,label:parity}]")


def _rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _rollouts(out: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((out / "rollouts").glob("step_*.jsonl"))}


def test_grpo_run_logs_saves_and_resumes_the_prompt_stream(tmp_path, shard, make_config):
    """Two updates per rollout (old log-probs recomputed), 4 steps, stopped after step 3 (inside the
    second rollout) and resumed: the metrics and saved rollouts of every step; the resumed run
    regenerates that rollout for the same prompts (its saved file, deleted before the resume, is
    written again with prompts 5-8) and skips the update already done. One run serves every check."""
    evalset = tmp_path / "eval.jsonl"  # the fixed evaluation set: 3 prompts, one of them twice
    evalset.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Add."},
                                                       {"role": "user", "content": q}], "answer": a}) + "\n"
                               for q, a in (("1+1=", "2"), ("2+3=", "5"), ("1+1=", "2"))))
    common = (*GRPO, "grpo.updates_per_rollout=2", "train.steps=4", "train.save_every=0",
              "rollout.eval_every=1", f"rollout.eval_prompts={evalset}", "rollout.eval_samples=2")
    out = tmp_path / "run"
    train(make_config(out, shard, *common, "train.exit_at_step=3"))
    first = _rollouts(out)
    assert list(first) == ["step_0000001.jsonl", "step_0000003.jsonl"]
    (out / "rollouts" / "step_0000003.jsonl").unlink()
    train(make_config(out, shard, *common))

    rows = _rows(out)
    assert sorted(rows) == [1, 2, 3, 4]
    assert mn.unregistered({k for r in rows.values() for k in r}) == [], "logged but not registered"
    for r in rows.values():
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0  # the parity reward varies in groups
        assert all(any(m.matches(k) for k in r) for m in mn.by_when("rollout")), sorted(r)
        assert 0 <= r["rollout/accuracy"] <= 1 and r["rollout/prompts"] == 4
        assert set(r) >= {"rollout/reward/math", "rollout/reward/parity"}
        total = r["rollout/reward/math"] + 0.5 * r["rollout/reward/parity"]
        assert r["rollout/reward_mean"] == pytest.approx(total, abs=1e-6)
    # the rollout is made on the first step of each pair, reused on the second (steps 1-3: the first
    # process); the resumed process starts inside the second rollout, so regenerates it (and its
    # old log-probs) for step 4
    assert [rows[s]["rollout/generate_s"] > 0 for s in (1, 2, 3, 4)] == [True, False, True, True]
    assert [rows[s]["rollout/old_logprobs_s"] > 0 for s in (1, 2, 4)] == [True, False, True]
    assert [rows[s]["consumed_samples"] for s in rows] == [8, 16, 24, 32]
    # the fixed set is evaluated with each rollout made (rollout.eval_every=1), the same draws each
    # time: before any update (step 1) and with the rollouts of steps 3 and 4
    assert [s for s in rows if "rollout/eval_reward" in rows[s]] == [1, 3, 4]
    for s in (1, 3, 4):
        r = rows[s]
        assert r["rollout/eval_s"] > 0 and set(r) >= {m.name for m in mn.by_when("rollout-eval")}
        # all 3 lines of an explicit eval file (no de-duplication) x 2 samples; 1 greedy each
        acc, greedy = r["rollout/eval_accuracy"] * 6, r["rollout/eval_greedy_accuracy"] * 3
        assert acc == pytest.approx(round(acc)) and greedy == pytest.approx(round(greedy))
    assert rows[2]["rollout/eval_s"] == 0
    assert (out / "reward.png").stat().st_size > 0

    saved = _rollouts(out)
    assert list(saved) == ["step_0000001.jsonl", "step_0000003.jsonl"]  # step 3's written again
    for lines in saved.values():
        assert len(lines) == 16  # 4 prompts x 4 completions
        assert [x["group"] for x in lines] == [g for g in range(4) for _ in range(4)]
        for x in lines:
            assert x["prompt"].endswith("assistant\n") and x["record"]["answer"].isdigit()
            assert x["reward"] == x["components"]["math"] + 0.5 * x["components"]["parity"]
            assert 1 <= len(x["token_ids"]) <= 3
    prompts = {k: [x["prompt_line"] for x in v] for k, v in saved.items()}
    assert prompts["step_0000001.jsonl"][::4] == [1, 2, 3, 4]  # the stream in file order
    # resumed mid-rollout: the prompts of the uninterrupted stream, as the first process had them
    assert prompts["step_0000003.jsonl"] == [x["prompt_line"] for x in first["step_0000003.jsonl"]]
    assert prompts["step_0000003.jsonl"][::4] == [5, 6, 7, 8]


def test_moe_policy_trains_on_the_routing_of_its_rollouts(tmp_path, shard, make_config, monkeypatch):
    """grpo.routing_replay with a Qwen2-MoE policy, two updates per rollout: every forward of the
    training steps and of the old log-probs carries the rollout's experts (B, T, layers, K) for the
    tokens the engine fed (-1 in the dense layers, on padding and on each row's last token), the
    engine's own forwards none."""
    from megaqwen.models.qwen2_moe.model import Qwen2MoeForCausalLM

    seen = []
    replay = Qwen2MoeForCausalLM.replay_routing

    def spy(self, routed):
        seen.append(None if routed is None else routed.clone())
        return replay(self, routed)

    monkeypatch.setattr(Qwen2MoeForCausalLM, "replay_routing", spy)
    out = tmp_path / "run"
    train(make_config(out, shard, *GRPO, "model=debug-moe", "grpo.routing_replay=true",
                      "grpo.updates_per_rollout=2", "train.steps=2", "train.save_every=0"))
    rows = _rows(out)
    assert sorted(rows) == [1, 2] and all(math.isfinite(r["loss"]) for r in rows.values())
    replayed = [r for r in seen if r is not None]
    # 2 steps x 2 micro-batches trained, and their old log-probs computed once before the first
    assert len(replayed) == 8 and len(seen) > len(replayed)  # generation forwards replay nothing
    for r in replayed:
        assert r.dtype == torch.int16 and r.shape == (4, 24, 4, 2)  # micro-batch, seq_len, layers, top-2
        assert (r[:, :, [0, 2]] == -1).all()  # debug-moe's dense layers
        fed = (r[:, :, 1] >= 0).all(-1)  # (B, T) positions with the rollout's experts
        assert fed[:, :19].all()  # the 19-token prompts, every row
        assert (fed == (r[:, :, 3] >= 0).all(-1)).all() and not fed[:, -1].any()
        assert ((r[:, :, [1, 3]] >= -1) & (r[:, :, [1, 3]] < 8)).all()


def test_the_fixed_evaluation_set_scores_greedy_and_seeded_samples_of_each_distinct_prompt(tmp_path):
    """EvalSet: the distinct records of a prompt file, one greedy call and one seeded sampled call
    (samples per prompt, grouped), scored by grpo.rewards; means and the standard error over prompts."""
    from megaqwen.generate import Completion
    from megaqwen.rewards.combine import Rewards
    from megaqwen.rewards.spec import RewardSpec
    from megaqwen.train.rollout import EvalSet, PromptStream, standard_error

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n"
                            for q, a in (("1+1=", "2"), ("2+2=", "4"), ("1+1=", "2"))))
    stream = PromptStream(path, 64)
    evalset = EvalSet(stream)
    assert [p.line for p in evalset.prompts] == [1, 2] and len(EvalSet(stream, distinct=False).prompts) == 3
    enc = stream.tok.backend_tokenizer

    class Engine:  # answers "2" greedily; sampled: right for the first prompt, wrong for the second
        calls = []

        def generate(self, prompts, params):
            self.calls.append((len(prompts), params.is_greedy, params.seed))
            text = ["2"] * len(prompts) if params.is_greedy else ["2", "2", "2", "5", "5", "4"]
            return [Completion(p, enc.encode(t, add_special_tokens=False).ids) for p, t in zip(prompts, text)]

    res = evalset.run(Engine(), Rewards.build([RewardSpec()]), 3, (0,), samples=3, seed=5)
    assert Engine.calls == [(2, True, None), (6, False, 5)]
    assert res.greedy.tolist() == [1.0, 0.0] and res.sampled.tolist() == [1, 1, 1, 0, 0, 1]
    m = res.metrics()
    assert m["rollout/eval_greedy_accuracy"] == 0.5 and m["rollout/eval_accuracy"] == pytest.approx(4 / 6)
    # prompts are the units: means 1 and 1/3, std of the two means / sqrt(2)
    want = statistics.stdev([1, 1 / 3]) / math.sqrt(2)
    assert standard_error(res.sampled.view(2, 3)) == pytest.approx(want)


def test_rows_put_the_labels_where_the_completion_is_predicted():
    rows = make_rows([[5, 6, 7], [8, 9]], [[10, 11], [12]], 6, pad_id=0, logprobs=[[-0.5, -1.5], [-2.0]])
    assert rows["tokens"].tolist() == [[5, 6, 7, 10, 11, 0], [8, 9, 12, 0, 0, 0]]
    x = IGNORE_INDEX
    assert rows["labels"].tolist() == [[x, x, 10, 11, x, x], [x, 12, x, x, x, x]]
    assert rows["old_logprobs"].tolist() == [[0, 0, -0.5, -1.5, 0, 0], [0, -2.0, 0, 0, 0, 0]]
    assert rows["position_ids"][1].tolist() == list(range(6))
    # labels are the next tokens, as the trainer's: labels[:, i] == tokens[:, i + 1] where set
    lab, tok = rows["labels"][:, :-1], rows["tokens"][:, 1:]
    assert bool(((lab == tok) | (lab == x)).all())
    assert spread([0, 1, 2], 2, 3) == [[0, None, None], [1, 2, None]]
    assert spread([], 1, 2) == [[None, None]]
    with pytest.raises(ValueError, match="train.seq_len=4"):
        make_rows([[1, 2, 3]], [[4, 5]], 4, pad_id=0)


@pytest.mark.parametrize("overrides, match", [
    (("parallel.pp=2",), "parallel.pp=2: rollout.engine=native generates with the whole model"),
    (("parallel.cp=2",), "parallel.cp=2: rollout.engine=native does not generate"),
    (("rollout.temperature=0",), "a greedy group is G copies"),
    (("rollout.top_p=0",), "rollout.top_p must be in"),
    (("rollout.engine=sglang",), "rollout.engine='sglang' is not one of"),
    (("rollout.prompts=",), "needs rollout.prompts"),
    (("rollout.prompts=/nonexistent/p.jsonl",), "no such file"),
    (("grpo.group_size=3",), "is not a multiple of grpo.group_size=3"),
    (("grpo.max_new_tokens=24",), "leaves no room for the prompt"),
])
def test_bad_rollout_configs_are_refused_with_the_fix(tmp_path, shard, make_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, shard, *GRPO, *overrides).validate()


def test_bad_prompt_files_are_refused_naming_the_line(tmp_path, shard, make_config):
    from megaqwen.train.rollout import PromptStream

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"question": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: a prompt record needs `prompt`"):
        PromptStream(bad, 20)
    bad.write_text('{"prompt": "1+1="}\nnot json\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not JSON"):
        PromptStream(bad, 20)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x " * 50, "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"long.jsonl:1: the prompt is \d+ tokens"):
        PromptStream(long, 20)[0]
    # dp ranks take whole prompts: 8 rows / 4 per group = 2 prompts do not split over 4 dp ranks
    from megaqwen.train.rollout import RolloutBatches

    cfg = make_config(tmp_path / "run", shard, *GRPO)
    env = type("Env", (), {"dp_size": 4, "dp_rank": 0, "mesh": None, "rank": 0,
                           "device": torch.device("cpu")})()
    with pytest.raises(ValueError, match="does not split over 4 data-parallel ranks"):
        RolloutBatches(replace(cfg), env, None, 0, 1, engine=object())


def test_grpo_recipe_composes_with_the_report_settings():
    import megaqwen.train.main  # noqa: F401  (registers the schema)
    from megaqwen.train.preflight import compose_config

    cfg = compose_config(["recipe=grpo-qwen2.5", "model=qwen2.5-7b", "rollout.prompts=arithmetic"])
    cfg.validate()
    t, g = cfg.train, cfg.grpo
    # Qwen2.5 report sec. 4.2: 2048 query-response pairs per episode, 8 samples per query
    assert (t.objective, t.global_batch_size, g.group_size, g.updates_per_rollout) == ("grpo", 2048, 8, 1)
    assert t.global_batch_size // g.group_size == 256 and cfg.rollout.engine == "vllm"


def test_toy_task_files_regenerate_byte_for_byte(tmp_path):
    from megaqwen.data_pipeline.samples import make_arithmetic
    from megaqwen.train.rollout_config import shipped_prompts

    make_arithmetic.main(["--out-dir", str(tmp_path)])
    shipped = shipped_prompts("arithmetic").parent
    for name in ("arithmetic_sft.jsonl", "arithmetic_pairs.jsonl", "arithmetic_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
    from megaqwen.rewards.sample import Sample

    near = make_arithmetic.closeness([Sample({"answer": "7"}, t) for t in ("7", "9", "17", "x")] +
                                     [Sample({"prompt": "no answer"}, "7")])
    assert near == [1.0, 0.6, 0.0, 0.0, None]
