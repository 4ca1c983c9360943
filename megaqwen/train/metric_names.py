"""Every metric the trainer logs (metrics.jsonl and W&B): name, unit, meaning, when it appears, and
the W&B section and panel it is drawn in.

This registry is the documentation (docs/metrics.md is generated from it) and the source of the W&B
workspace (launch/wandb/dashboard.py); tests/train/test_metric_names.py runs the trainer and fails
on any logged key that is not listed here, so neither can drift from the code.

A name may hold placeholders for families of keys: `{r}` a rank, `{i}` a layer index, `{e}` an
expert index, `{name}` a data-blend source (its shard file name, e.g. `web` for `shards/web`).

When a metric appears is one of WHEN (e.g. "always", "moe", "eval", "checkpoint").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WHEN = {
    "always": "every step of every run",
    "world<=16": "every step, one key per rank, when the run has at most 16 ranks",
    "multi-rank": "every step when the run has more than one rank",
    "mfu": "every step when the device's peak FLOP/s is known (a CUDA GPU in the table, or train.peak_flops)",
    "moe": "every step of an MoE model (`moe/*` with the native engine; DeepSpeed logs aux/z loss only)",
    "moe-small": "as moe, when layers x experts <= 512 (the heat map expert_load.png shows the rest)",
    "pp": "every step under pipeline parallelism (parallel.pp > 1)",
    "blend": "every step when data.path is a blend of several shards",
    "eval": "every train.eval_every steps and at the last step",
    "checkpoint": "on the row after a step that saved a checkpoint (the row is written before the save, "
                  "so a checkpointed step always has its row); train.async_save: checkpoint_save_s and "
                  "checkpoint_step on the row after the background write is seen committed. A run's last "
                  "save is reported in the log only",
    "spike": "at a step whose loss is a spike (train.spike_factor > 0)",
    "rollback": "at a step whose update was dropped under train.on_nonfinite=rollback",
    "objective": "every step when the train.objective declares metrics (`Objective.metrics`)",
    "dpo": "every step of a DPO run (train.objective=dpo)",
    "reward": "every step of a reward-model run (train.objective=reward)",
    "grpo": "every step of a GRPO run (train.objective=grpo)",
    "grpo-kl": "every step of a GRPO run with a KL penalty (grpo.kl_coef > 0)",
    "grpo-seq": "every step of a GRPO run with per-response aggregation (grpo.loss_agg=sequence|constant)",
    "objective-eval": "at every validation (as eval) when the train.objective declares metrics",
    "rollout": "every step of a GRPO run (train.objective=grpo): the rollout the step trains on, and the "
               "time the step spent in each phase (0 for a phase the step did not run)",
    "rollout-math": "every step of a GRPO run whose grpo.rewards include math, with a verifiable prompt",
    "rollout-eval": "on the steps of a GRPO run with rollout.eval_every > 0 whose rollout evaluates the "
                    "fixed set (rollout 0 and every rollout.eval_every-th); the accuracies when grpo.rewards "
                    "include math",
}
"""when a metric is logged -> what that means"""

# W&B workspace sections, in display order
SECTIONS = ("training", "validation", "throughput", "memory", "data mix", "moe", "pipeline", "reliability",
            "dpo", "grpo", "rollout")

_PLACEHOLDER = {"{r}": r"\d+", "{i}": r"\d+", "{e}": r"\d+", "{name}": r"[^/]+"}


@dataclass(frozen=True)
class Metric:
    name: str
    """the logged key, or a family of keys with placeholders ({r}, {i}, {e}, {name})"""
    unit: str
    """unit of the value ("" for a plain number)"""
    meaning: str
    """what it measures, in one sentence"""
    when: str
    """when it is logged: one of WHEN"""
    section: str
    """W&B workspace section: one of SECTIONS"""
    panel: str
    """title of the W&B line plot it is drawn in (metrics with the same panel share a plot)"""

    @property
    def is_family(self) -> bool:
        return "{" in self.name

    @property
    def regex(self) -> str:
        """A regular expression matching exactly the keys this entry stands for."""
        out = re.escape(self.name)
        for ph, rx in _PLACEHOLDER.items():
            out = out.replace(re.escape(ph), rx)
        return out

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.regex, key) is not None


def _m(name, unit, meaning, when, section, panel) -> Metric:
    return Metric(name, unit, meaning, when, section, panel)


METRICS: tuple[Metric, ...] = (
    # training
    _m("loss", "nats/token", "the training objective (train.objective; cross-entropy for lm), mean over "
       "every unit of the step (valid token for lm; all ranks)",
       "always", "training", "loss"),
    _m("lr", "", "learning rate of the step (warmup + decay schedule)", "always", "training",
       "learning rate"),
    _m("grad_norm", "", "global L2 norm of the gradients before clipping (all shards, all ranks)", "always",
       "training", "gradient norm"),
    _m("consumed_samples", "samples", "samples consumed by all ranks since the start of the data stream",
       "always", "training", "consumed samples"),
    # validation
    _m("val_loss", "nats/token", "held-out cross-entropy, token-weighted mean over train.eval_iters batches",
       "eval", "validation", "validation loss"),
    _m("val_ppl", "", "held-out perplexity, exp(val_loss)", "eval", "validation", "validation perplexity"),
    _m("val_tokens", "tokens", "tokens the validation loss was averaged over", "eval", "validation",
       "validation tokens"),
    # throughput
    _m("tokens_per_s", "tokens/s", "global training throughput: global_batch_size x seq_len / step time",
       "always", "throughput", "tokens/s"),
    _m("tokens_per_s_per_device", "tokens/s", "tokens_per_s divided by the number of ranks", "always",
       "throughput", "tokens/s per device"),
    _m("mfu", "fraction", "model FLOPs utilisation: 6N(active)+attention FLOPs/token x tokens/s over the "
       "ranks' peak bf16 FLOP/s", "mfu", "throughput", "MFU"),
    _m("step_time_s", "s", "wall time of the optimizer step on the logging rank (forward, backward, "
       "optimizer)", "always", "throughput", "step time"),
    _m("data_time_s", "s", "time the step waited for its micro-batches on the logging rank (reading and "
       "packing; near 0 when data.num_workers prefetch ahead)", "always", "throughput", "data time"),
    # memory
    _m("peak_mem_gib", "GiB", "peak allocated device memory of the logging rank", "always", "memory",
       "peak memory"),
    _m("peak_mem_gib_max", "GiB", "peak allocated device memory, highest over the ranks", "always", "memory",
       "peak memory"),
    _m("peak_mem_gib_min", "GiB", "peak allocated device memory, lowest over the ranks", "always", "memory",
       "peak memory"),
    _m("peak_mem_gib/rank{r}", "GiB", "peak allocated device memory of rank r", "world<=16", "memory",
       "peak memory per rank"),
    _m("objective/{name}", "per unit", "a metric the objective declares (`Objective.metrics`), its sum over "
       "the step divided by the step's units (valid tokens for lm)", "objective", "training", "objective"),
    # data mix
    _m("mix/{name}", "fraction", "share of the step's samples (= tokens: samples are packed to seq_len) "
       "drawn from blend source `name`", "blend", "data mix", "data mix per source"),
    # MoE
    _m("aux_loss", "", "router load-balancing loss, mean over micro-batches and dp ranks", "moe", "moe",
       "router losses"),
    _m("z_loss", "", "router z-loss, mean over micro-batches and dp ranks", "moe", "moe", "router losses"),
    _m("moe/load_max", "x fair share", "most loaded expert's load relative to perfect balance, worst layer",
       "moe", "moe", "expert load (all layers)"),
    _m("moe/load_max_mean", "x fair share", "most loaded expert's relative load, mean over layers", "moe",
       "moe", "expert load (all layers)"),
    _m("moe/dropped", "assignments", "token-to-expert assignments over capacity this step, all layers", "moe",
       "moe", "dropped assignments"),
    _m("moe/dropped_frac", "fraction", "share of token-to-expert assignments dropped this step", "moe", "moe",
       "dropped fraction"),
    _m("moe/L{i}/load_max", "x fair share", "most loaded expert of layer i, relative to perfect balance",
       "moe", "moe", "expert load max per layer"),
    _m("moe/L{i}/load_min", "x fair share", "least loaded expert of layer i, relative to perfect balance",
       "moe", "moe", "expert load min per layer"),
    _m("moe/L{i}/dropped_frac", "fraction", "share of layer i's assignments dropped", "moe", "moe",
       "dropped fraction per layer"),
    _m("moe/L{i}/e{e}", "x fair share", "load of expert e of layer i, relative to perfect balance",
       "moe-small", "moe", "load per expert"),
    # pipeline
    _m("pp_bubble_theory", "fraction", "idle fraction of the pipeline schedule in theory", "pp", "pipeline",
       "pipeline bubble"),
    _m("pp_bubble_measured", "fraction", "1 - time in stage compute / step time, mean over pp ranks", "pp",
       "pipeline", "pipeline bubble"),
    _m("pp_rank{r}_peak_mem_gib", "GiB", "peak device memory of pipeline rank r", "pp", "pipeline",
       "peak memory per stage"),
    # reliability
    _m("skipped_steps", "steps", "steps so far in this process whose update was dropped for non-finite "
       "gradients", "always", "reliability", "skipped steps"),
    _m("loss_spike", "flag", "1 when the loss exceeds train.spike_factor x the mean of the previous 20",
       "spike", "reliability", "loss spikes"),
    _m("rolled_back_to", "step", "checkpoint step whose weights and optimizer state were reloaded",
       "rollback", "reliability", "rollbacks"),
    _m("checkpoint_blocking_s", "s", "time training stood still for the checkpoint save (the copy, plus any "
       "wait for the previous save)", "checkpoint", "reliability", "checkpoint time"),
    _m("checkpoint_save_s", "s", "checkpoint save from start to commit on storage", "checkpoint",
       "reliability", "checkpoint time"),
    _m("checkpoint_step", "step", "step of the checkpoint whose save just committed", "checkpoint",
       "reliability", "checkpoint step"),
    _m("step_time_max_s", "s", "slowest rank's step time", "multi-rank", "reliability",
       "step time over ranks"),
    _m("step_time_min_s", "s", "fastest rank's step time", "multi-rank", "reliability",
       "step time over ranks"),
    _m("slowest_rank", "rank", "rank with the slowest step (persistently the same: a bad GPU, NIC or host)",
       "multi-rank", "reliability", "slowest rank"),
    _m("step_time_spread", "fraction", "slowest / fastest step time - 1", "multi-rank", "reliability",
       "straggler spread"),
    # dpo (megaqwen/train/objectives.py): means per preference pair over the step, all ranks
    _m("dpo/loss", "nats/pair", "the DPO loss (dpo.loss: sigmoid / cDPO, or ipo), mean per pair; equals "
       "`loss`", "dpo", "dpo", "DPO loss"),
    _m("dpo/rewards_chosen", "nats", "implicit reward of the chosen response, beta x (log pi - log ref) "
       "summed over its tokens (per-token mean under ipo)", "dpo", "dpo", "DPO rewards"),
    _m("dpo/rewards_rejected", "nats", "implicit reward of the rejected response, as dpo/rewards_chosen",
       "dpo", "dpo", "DPO rewards"),
    _m("dpo/margin", "nats", "dpo/rewards_chosen - dpo/rewards_rejected, mean per pair", "dpo", "dpo",
       "DPO reward margin"),
    _m("dpo/accuracy", "fraction", "share of pairs whose chosen reward exceeds the rejected one", "dpo",
       "dpo", "DPO accuracy"),
    _m("dpo/logps_chosen", "nats", "policy log-probability of the chosen response (summed over its "
       "tokens; per-token mean under ipo)", "dpo", "dpo", "DPO log-probabilities"),
    _m("dpo/logps_rejected", "nats", "policy log-probability of the rejected response, as "
       "dpo/logps_chosen", "dpo", "dpo", "DPO log-probabilities"),
)

METRICS += (
    # reward model (megaqwen/train/reward.py): means per preference pair over the step, all ranks
    _m("reward/accuracy", "fraction", "share of pairs whose chosen response's reward exceeds the "
       "rejected one's", "reward", "training", "reward accuracy"),
    _m("reward/margin", "", "reward of the chosen response - reward of the rejected one, mean per pair",
       "reward", "training", "reward margin"),
    _m("reward/chosen", "", "reward (score-head output at the response's last token) of the chosen "
       "response, mean per pair", "reward", "training", "rewards"),
    _m("reward/rejected", "", "reward of the rejected response, mean per pair", "reward", "training",
       "rewards"),
    _m("val_{name}/{name}", "per unit", "an objective metric (`Objective.metrics`, e.g. reward/accuracy: "
       "a reward model's accuracy on held-out pairs) over the validation batches: its sum / their units",
       "objective-eval", "validation", "objective metrics on held-out data"),
)

METRICS += (
    # grpo (megaqwen/train/grpo.py): means per unit of the step (per response token under
    # grpo.loss_agg=token; per response, of each response's token mean, under sequence / constant)
    _m("grpo/clip_low", "fraction", "share of response tokens whose ratio is clipped below (advantage < 0 "
       "and ratio < 1 - grpo.clip_low: no surrogate gradient)", "grpo", "grpo", "GRPO clip fraction"),
    _m("grpo/clip_high", "fraction", "share of response tokens whose ratio is clipped above (advantage > 0 "
       "and ratio > 1 + grpo.clip_high)", "grpo", "grpo", "GRPO clip fraction"),
    _m("grpo/ratio", "", "importance ratio pi / pi_old of the sampled tokens, mean", "grpo", "grpo",
       "GRPO importance ratio"),
    _m("grpo/nll", "nats/token", "-log pi of the sampled response tokens, mean: a Monte-Carlo estimate of "
       "the policy's entropy on its own samples", "grpo", "grpo", "GRPO entropy estimate"),
    _m("grpo/kl", "nats/token", "k3 estimate of KL(pi || pi_ref) per response token, mean", "grpo-kl", "grpo",
       "GRPO KL to the reference"),
    _m("grpo/response_length", "tokens", "response tokens per response, mean", "grpo-seq", "grpo",
       "GRPO response length"),
)

METRICS += (
    # rollout (megaqwen/train/rollout.py): the rollout batch of the step, all dp ranks' rows
    _m("rollout/reward_mean", "", "total reward (grpo.rewards, weighted sum of the components), mean over "
       "the rollout's completions", "rollout", "rollout", "reward"),
    _m("rollout/reward_std", "", "standard deviation of the total reward over the rollout's completions",
       "rollout", "rollout", "reward"),
    _m("rollout/reward/{name}", "", "reward component `name` (its label in grpo.rewards, unweighted), mean "
       "over the completions it applies to", "rollout", "rollout", "reward components"),
    _m("rollout/accuracy", "fraction", "share of the completions of verifiable (maths) prompts whose "
       "answer is right", "rollout-math", "rollout", "accuracy on verifiable prompts"),
    _m("rollout/response_length", "tokens", "generated tokens per completion (stop token included), mean",
       "rollout", "rollout", "response length"),
    _m("rollout/stop_fraction", "fraction", "share of completions that ended with a stop token (the rest "
       "hit grpo.max_new_tokens)", "rollout", "rollout", "stop fraction"),
    _m("rollout/equal_groups", "fraction", "share of the rollout's prompts whose group rewards are all equal "
       "(zero advantage: no signal)", "rollout", "rollout", "groups without signal"),
    _m("rollout/rows_dropped", "rows", "completions dropped with their all-equal groups "
       "(grpo.filter_equal_groups; 0 when off)", "rollout", "rollout", "rows dropped"),
    _m("rollout/prompts", "prompts", "prompts in the rollout (all dp ranks)", "rollout", "rollout",
       "prompts per rollout"),
    _m("rollout/generate_s", "s", "time this step spent generating completions (engine.generate; 0 on "
       "steps that reuse a rollout)", "rollout", "rollout", "time per phase"),
    _m("rollout/score_s", "s", "time this step spent decoding and scoring completions (grpo.rewards)",
       "rollout", "rollout", "time per phase"),
    _m("rollout/old_logprobs_s", "s", "time this step spent recomputing the policy's old log-probabilities "
       "(off-policy runs with grpo.old_logprobs=recompute)", "rollout", "rollout", "time per phase"),
    _m("rollout/eval_s", "s", "time this step spent evaluating the fixed set (rollout.eval_every; 0 on "
       "other steps)", "rollout", "rollout", "time per phase"),
    _m("rollout/eval_greedy_reward", "", "total reward of the greedy completions of the fixed evaluation "
       "set (rollout.eval_prompts), mean", "rollout-eval", "rollout", "fixed-set evaluation"),
    _m("rollout/eval_greedy_accuracy", "fraction", "share of the fixed set's greedy completions whose "
       "(maths) answer is right", "rollout-eval", "rollout", "fixed-set evaluation"),
    _m("rollout/eval_reward", "", "total reward of rollout.eval_samples sampled completions per fixed-set "
       "prompt (the rollouts' sampling, a fixed seed), mean", "rollout-eval", "rollout",
       "fixed-set evaluation"),
    _m("rollout/eval_accuracy", "fraction", "share of the fixed set's sampled completions whose (maths) "
       "answer is right", "rollout-eval", "rollout", "fixed-set evaluation"),
    _m("rollout/sync_s", "s", "time this step spent pushing the weights to the engine (0 for "
       "rollout.engine=native, which runs the trainer's modules)", "rollout", "rollout", "time per phase"),
    _m("rollout/train_s", "s", "the rest of the step: reference and policy forward/backward, optimizer",
       "rollout", "rollout", "time per phase"),
)

for _x in METRICS:  # checked on import: a typo here must not ship
    if _x.when not in WHEN or _x.section not in SECTIONS:
        raise ValueError(f"metric {_x.name}: when={_x.when!r} must be one of {list(WHEN)}, "
                         f"section={_x.section!r} one of {SECTIONS}")


def lookup(key: str) -> Metric | None:
    """The registry entry of a logged key (exact names first, then families), or None."""
    for x in METRICS:
        if not x.is_family and x.name == key:
            return x
    return next((x for x in METRICS if x.is_family and x.matches(key)), None)


def unregistered(keys) -> list[str]:
    """The keys (e.g. of metrics.jsonl rows, less "step") that the registry does not document."""
    return sorted({k for k in keys if k != "step" and lookup(k) is None})


def by_when(*when: str) -> list[Metric]:
    return [x for x in METRICS if x.when in when]


def markdown_table() -> str:
    """docs/metrics.md: the registry as one table per W&B section."""
    lines = ["# Training metrics", "",
             "Generated from `megaqwen/train/metric_names.py` by "
             "`python -m megaqwen.train.metric_names > docs/metrics.md`; do not edit by hand.", "",
             "Every row of `OUT_DIR/metrics.jsonl` holds `step` and the keys below; W&B receives the same "
             "keys at the same step. Placeholders: `{r}` rank, `{i}` layer, `{e}` expert, `{name}` blend "
             "source (the shard's file name).", "",
             "When a metric appears:", ""]
    lines += [f"- `{w}`: {d}" for w, d in WHEN.items()]
    for section in SECTIONS:
        rows = [x for x in METRICS if x.section == section]
        lines += ["", f"## {section}", "", "| metric | unit | when | meaning |", "|---|---|---|---|"]
        lines += [f"| `{x.name}` | {x.unit} | {x.when} | {x.meaning} |" for x in rows]
    return "\n".join(lines) + "\n"



if __name__ == "__main__":
    print(markdown_table(), end="")
