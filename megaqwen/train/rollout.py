"""The online RL loop's data side (`train.objective=grpo`): rollout -> reward -> advantage -> rows.

`RolloutBatches` replaces the trainer's `BatchIterator` (`megaqwen.train.loop.build_batches`): the
step still pulls its micro-batches with `next(batches)`, and every grpo.updates_per_rollout steps the
iterator makes a new rollout batch first:

1. weight sync: the engine gets the policy's current weights (`Engine.sync_weights`: a no-op for
   `native`, which runs the trainer's own modules in place; vllm/hf receive the weights);
2. generation: this dp rank's share of the prompts, grpo.group_size completions each, sampled by the
   engine (`rollout.*` sampling settings, stop at `<|im_end|>` / `<|endoftext|>`, at most
   grpo.max_new_tokens), seeded per prompt by train.seed and its stream position, so tp ranks sample
   the same tokens, a dp layout samples what one process does, and a rerun samples the same ones;
3. scoring: grpo.rewards on every completion (`megaqwen.rewards.combine.Rewards`), total + components;
4. advantages: `grpo.group_advantages` per prompt's group; with grpo.filter_equal_groups the groups
   whose rewards are all equal are dropped (`grpo.kept_rows`);
5. rows: one response per row, `tokens` = prompt + completion padded with `<|endoftext|>` to
   train.seq_len, `labels` = the completion's tokens at the positions that predict them (-100 on the
   prompt and the padding), `advantages` (B, T) (the row's on its labels), plain positions; cut into
   the updates' global
   batches (the kept rows spread evenly over them; rows of dropped groups leave padding rows, all
   labels -100, which count no units);
6. old log-probs (off-policy only: updates_per_rollout > 1 or grpo.old_logprobs=rollout):
   `recompute` runs the policy forward (no grad) on every micro-batch before the first update, as the
   reference model does (`megaqwen.train.reference.ReferenceModel`, so tp/dp/FSDP layouts apply);
   `rollout` places the engine's log-probabilities of the sampled tokens.
7. routing replay (grpo.routing_replay, MoE policies, native engine): the engine records the experts
   every sparse layer chose for each token it fed, and the rows carry them (`routed_experts`,
   `megaqwen.models.outputs.ROUTED_EXPERTS`), so the training and old-log-prob forwards route each
   token as the rollout did.

Stream position and resume: `consumed_samples` counts rows (= samples) of the steps served, the
trainer's usual unit; the prompt stream position is consumed_samples / grpo.group_size (prompts are
`rollout.prompts` lines, cycled in file order, dp rank r taking its contiguous share). A run resumed
from a checkpoint at step s regenerates the rollout that step s + 1 belongs to (with the restored
weights) and skips the updates already done, so step k always trains on the same prompts as in an
uninterrupted run.

Fixed-set evaluation (rollout.eval_every > 0, `EvalSet`): before rollout 0 and every eval_every-th
rollout, one greedy and rollout.eval_samples sampled completions (the rollouts' sampling, one fixed
seed) of every prompt of rollout.eval_prompts (default: the distinct records of rollout.prompts) are
scored with grpo.rewards and logged as rollout/eval_* on that step: the same prompts and draws each
time, so the curve follows the policy, not the prompts a step drew. Every rank evaluates the whole set
(tp ranks must; dp ranks get the same numbers).

Metrics (`rollout/*`, see `megaqwen.train.metric_names`): per step, the statistics of the rollout the
step trains on (reward mean / std and per component over all dp ranks, accuracy of the verifiable
prompts, response length, groups filtered) and the time this step spent in each phase (generation,
scoring, old log-probs, weight sync; training = the rest of the step). Rollouts are saved every
`rollout.save_every` rollouts to out_dir/rollouts/step_<first step>.jsonl (rank 0, every dp rank's
rows): prompt, completion, token ids, finish reason, reward and components, advantage, kept.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.models.outputs import ROUTED_EXPERTS
from megaqwen.parallel import setup as par
from megaqwen.train.config import Config
from megaqwen.train.rollout_config import check_rollout, eval_prompts_path, prompts_path

log = logging.getLogger(__name__)

ROLLOUT_DIR = "rollouts"


# ---------------------------------------------------------------------------------------------
# the prompt stream


@dataclass(frozen=True)
class Prompt:
    record: dict[str, Any]
    """The jsonl record as read (what the rewards see)."""
    ids: list[int]
    """The prompt rendered with the chat template + the assistant header, tokenised."""
    line: int


class PromptStream:
    """The `rollout.prompts` jsonl, cycled: stream position i is line i % n (1-based lines in errors).
    Every line is read and checked at start-up (a malformed one is an error naming its line: it would
    otherwise be a silent hole in the stream); prompts are tokenised when first used."""

    def __init__(self, path: Path, max_prompt_len: int):
        from megaqwen.data.chat import chat_tokenizer
        from megaqwen.data.prompts import read_prompt_records

        self.path, self.max_prompt_len = path, max_prompt_len
        self.tok, self.info = chat_tokenizer()
        # megaqwen.data.prompts: the one prompt-file reader and rendering rule (bad lines are errors)
        self.records: list[dict[str, Any]] = [{**p.record, "_line": p.line}
                                              for p in read_prompt_records(path)]
        if not self.records:
            raise ValueError(f"{path}: no prompt records")
        self._ids: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Prompt:
        k = i % len(self.records)
        rec = self.records[k]
        if k not in self._ids:
            from megaqwen.data.prompts import prompt_ids

            ids = prompt_ids(self.tok, rec)
            if len(ids) > self.max_prompt_len:
                raise ValueError(f"{self.path}:{rec['_line']}: the prompt is {len(ids)} tokens; with "
                                 f"grpo.max_new_tokens it must fit train.seq_len (at most "
                                 f"{self.max_prompt_len} prompt tokens): raise train.seq_len or drop it")
            self._ids[k] = ids
        record = {k2: v for k2, v in rec.items() if k2 != "_line"}
        return Prompt(record, self._ids[k], rec["_line"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# the fixed evaluation set


@dataclass(frozen=True)
class EvalResult:
    """Per-completion rewards of one evaluation: (N,) totals and the maths component (NaN where it does
    not apply), greedy (one per prompt) and sampled (`samples` per prompt)."""

    greedy: torch.Tensor
    greedy_math: torch.Tensor | None
    sampled: torch.Tensor
    sampled_math: torch.Tensor | None

    def metrics(self) -> dict[str, float]:
        """`rollout/eval_*` means (and the sampled mean's standard error over prompts)."""
        out = {"rollout/eval_greedy_reward": float(self.greedy.mean())}
        if self.greedy_math is not None and not bool(self.greedy_math.isnan().all()):
            out["rollout/eval_greedy_accuracy"] = float(self.greedy_math.nanmean())
        if self.sampled.numel():
            out["rollout/eval_reward"] = float(self.sampled.mean())
            if self.sampled_math is not None and not bool(self.sampled_math.isnan().all()):
                out["rollout/eval_accuracy"] = float(self.sampled_math.nanmean())
        return out


def standard_error(values_PS: torch.Tensor) -> float:
    """Standard error of the mean of (P prompts, S samples) values, prompts the independent units (the
    samples of one prompt are correlated): std of the P prompt means / sqrt(P)."""
    means = values_PS.double().reshape(values_PS.shape[0], -1).mean(1)
    return float(means.std() / math.sqrt(means.numel())) if means.numel() > 1 else float("nan")


def eval_seed(train_seed: int) -> int:
    """The sampling seed of every fixed-set evaluation of a run (train.seed's)."""
    return (train_seed * 1_000_003 + 17) % 2**62


class EvalSet:
    """A fixed set of prompts (`rollout.eval_prompts`; by default the distinct records of the prompt
    stream), evaluated with the same sampling seed each time: a curve of the policy itself, not of the
    prompts a step happened to draw."""

    def __init__(self, stream: PromptStream, distinct: bool = True):
        self.stream = stream
        seen: set[str] = set()
        self.prompts: list[Prompt] = []
        for i in range(len(stream)):
            key = json.dumps({k: v for k, v in stream.records[i].items() if k != "_line"}, sort_keys=True)
            if distinct and key in seen:
                continue
            seen.add(key)
            self.prompts.append(stream[i])

    def run(self, engine, rewards, max_new_tokens: int, stop_ids: tuple[int, ...], samples: int,
            temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> EvalResult:
        """One greedy completion of every prompt and `samples` sampled ones (one engine call each)."""
        from megaqwen.generate import SamplingParams
        from megaqwen.rewards.sample import Sample

        def score(reps: int, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
            outs = engine.generate([p.ids for p in self.prompts for _ in range(reps)], params)
            scored = rewards([Sample(record=self.prompts[i // reps].record,
                                     completion=self.stream.decode(o.token_ids), token_ids=list(o.token_ids))
                              for i, o in enumerate(outs)])
            maths = scored.components.get("math")
            return scored.total.float(), None if maths is None else maths.float()

        greedy = score(1, SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_token_ids=stop_ids))
        if samples:
            sampled = score(samples, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                    top_p=top_p, top_k=top_k, stop_token_ids=stop_ids,
                                                    seed=seed))
        else:
            sampled = (torch.zeros(0), None)
        return EvalResult(*greedy, *sampled)


# ---------------------------------------------------------------------------------------------
# rows


def make_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], seq_len: int, pad_id: int,
              logprobs: list[list[float]] | None = None,
              routed: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """(N, seq_len) tokens / labels / position_ids / document_ids (+ old_logprobs (N, seq_len) when
    `logprobs`; + routed_experts (N, seq_len, num_layers, K) when `routed`, the engine's
    `Completion.routed_experts`, -1 past what it fed): one prompt + completion per row, padded with
    `pad_id`; labels[i] = tokens[i + 1] on the completion's tokens, -100 elsewhere."""
    n = len(prompt_ids)
    tokens = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros((n, seq_len), dtype=torch.float32) if logprobs is not None else None
    for r, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if len(p) + len(c) > seq_len:
            raise ValueError(f"row {r}: prompt {len(p)} + completion {len(c)} tokens > "
                             f"train.seq_len={seq_len}")
        tokens[r, :len(p) + len(c)] = torch.tensor(p + c)
        if c:
            labels[r, len(p) - 1:len(p) - 1 + len(c)] = torch.tensor(c)
            if old is not None:
                old[r, len(p) - 1:len(p) - 1 + len(c)] = torch.tensor(logprobs[r], dtype=torch.float32)
    out = {"tokens": tokens, "labels": labels,
           "position_ids": torch.arange(seq_len).expand(n, seq_len).contiguous(),
           "document_ids": torch.zeros((n, seq_len), dtype=torch.long)}
    if old is not None:
        out["old_logprobs"] = old
    if routed is not None:
        out[ROUTED_EXPERTS] = torch.full((n, seq_len, *routed[0].shape[1:]), -1, dtype=torch.int16)
        for r, (p, c, e) in enumerate(zip(prompt_ids, completion_ids, routed, strict=True)):
            fed = len(p) + max(len(c) - 1, 0)  # the completion's last token is never fed
            if e.shape[0] != fed:
                raise ValueError(f"row {r}: the engine routed {e.shape[0]} tokens, fed were {fed} (prompt "
                                 "+ completion but its last token)")
            out[ROUTED_EXPERTS][r, :e.shape[0]] = e
    return out


def spread(kept: list[int], parts: int, size: int) -> list[list[int | None]]:
    """`kept` row indices spread over `parts` lists of `size` slots (as evenly as possible, in order),
    None filling the empty slots (padding rows)."""
    out = []
    for k in range(parts):
        chunk: list[int | None] = list(kept[len(kept) * k // parts:len(kept) * (k + 1) // parts])
        out.append(chunk + [None] * (size - len(chunk)))
    return out


def _select(rows: dict[str, torch.Tensor], adv: torch.Tensor, slots: list[int | None],
            pad_id: int) -> dict[str, torch.Tensor]:
    """The rows at `slots` (None: a padding row: pad tokens, no labels, advantage 0)."""
    idx = torch.tensor([0 if s is None else s for s in slots])
    pad = torch.tensor([s is None for s in slots])
    out = {k: v[idx].clone() for k, v in rows.items()}
    out["tokens"][pad] = pad_id
    out["labels"][pad] = IGNORE_INDEX
    if "old_logprobs" in out:
        out["old_logprobs"][pad] = 0.0
    if ROUTED_EXPERTS in out:  # a padding row's tokens route freely
        out[ROUTED_EXPERTS][pad] = -1
    adv_B = torch.where(pad, 0.0, adv[idx].float())
    # (B, T): a pipeline shards every objective field along the sequence (a (B,) field cannot be)
    out["advantages"] = torch.where(out["labels"] != IGNORE_INDEX, adv_B[:, None], 0.0).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# the iterator


class RolloutBatches:
    """Micro-batches of GRPO rows, made by rollouts of the current policy (module docstring)."""

    dataset = None  # no blend to report (the trainer's mix meter reads this)

    def __init__(self, cfg: Config, env: par.DistEnv, model, consumed_samples: int, accum_steps: int,
                 engine=None, reference_like=None, start_step: int = 0):
        from megaqwen.rewards.combine import Rewards
        from megaqwen.tokenizer import EOD_ID, IM_END_ID

        check_rollout(cfg)
        t, g = cfg.train, cfg.grpo
        self.cfg, self.env, self.model, self.accum_steps = cfg, env, model, accum_steps
        self.group = g.group_size
        self.updates = g.updates_per_rollout
        self.prompts_per_rollout = t.global_batch_size * self.updates // self.group
        if self.prompts_per_rollout % env.dp_size:
            raise ValueError(f"a rollout of {self.prompts_per_rollout} prompts (train.global_batch_size x "
                             f"grpo.updates_per_rollout / grpo.group_size) does not split over "
                             f"{env.dp_size} data-parallel ranks: make it a multiple of {env.dp_size}")
        self.local_prompts = self.prompts_per_rollout // env.dp_size
        self.rows_per_step = t.global_batch_size // env.dp_size  # this rank's rows per step
        self.mbs = t.micro_batch_size
        if consumed_samples % t.global_batch_size:
            raise ValueError(f"consumed_samples={consumed_samples} is not a whole number of steps of "
                             f"{t.global_batch_size} rows")
        self._consumed = consumed_samples
        self._step = start_step  # the trainer's steps done (names the saved rollouts)
        self.stream = PromptStream(prompts_path(cfg), t.seq_len - g.max_new_tokens)
        self.pad_id, self.stop_ids = EOD_ID, (IM_END_ID, EOD_ID)
        self.rewards = Rewards.build(g.rewards)
        self.engine = engine if engine is not None else self._build_engine(cfg, env, model)
        self._synced = cfg.rollout.engine == "native"  # native runs the model in place
        self._queue: list[dict[str, torch.Tensor]] = []  # this step's remaining micro-batches
        self._steps: list[list[dict[str, torch.Tensor]]] = []  # the rollout's remaining steps
        self._stats: dict[str, float] = {}
        self._eval_stats: dict[str, float] = {}
        self._phase = dict.fromkeys(("generate_s", "score_s", "old_logprobs_s", "sync_s", "eval_s"), 0.0)
        self.eval_set = (EvalSet(PromptStream(eval_prompts_path(cfg), t.seq_len - g.max_new_tokens),
                                 distinct=not cfg.rollout.eval_prompts) if cfg.rollout.eval_every else None)
        self._reference_like = reference_like
        from megaqwen.train.grpo import on_policy

        self.off_policy = not on_policy(g)

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def _build_engine(cfg: Config, env: par.DistEnv, model):
        from megaqwen.generate import build_engine
        from megaqwen.train.build import use_bf16

        kind = cfg.rollout.engine
        amp = torch.bfloat16 if use_bf16(cfg.train.dtype, env.device) else None
        sync_group = None
        if env.mesh is not None and env.dp_size > 1 and (cfg.parallel.dp_mode == "fsdp"
                                                         or cfg.parallel.zero_stage == 3):
            sync_group = env.mesh.dp_group  # parameters gathered inside each forward: lockstep
        if kind == "native":
            return build_engine("native", model, sync_group=sync_group, autocast_dtype=amp)
        if kind == "hf":
            return build_engine("hf", model, device=env.device)
        init = cfg.train.init_from
        if not init:
            raise ValueError("rollout.engine=vllm starts vLLM from an HF folder: set train.init_from to one")
        return build_engine("vllm", model, path=init)

    # -- iterator protocol (the trainer's view) -------------------------------------------------

    @property
    def consumed_samples(self) -> int:
        """Rows of the steps served so far, all dp ranks (checkpointed by the trainer)."""
        return self._consumed

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._queue:
            if not self._steps:
                self._rollout()
            self._queue = self._steps.pop(0)
            self._consumed += self.cfg.train.global_batch_size
            self._step += 1
        return self._queue.pop(0)

    def step_metrics(self, step_time_s: float) -> dict[str, float]:
        """The rollout statistics of the step just taken and its phase times (`rollout/*`); the phase
        timers restart."""
        phases = {f"rollout/{k}": v for k, v in self._phase.items()}
        busy = sum(self._phase.values())
        self._phase = dict.fromkeys(self._phase, 0.0)
        evals, self._eval_stats = self._eval_stats, {}
        return {**self._stats, **evals, **phases, "rollout/train_s": max(step_time_s - busy, 0.0)}

    # -- one rollout ----------------------------------------------------------------------------

    def _rollout(self) -> None:
        from megaqwen.rewards.sample import Sample
        from megaqwen.train.grpo import group_advantages, kept_rows

        cfg, env, g, r = self.cfg, self.env, self.cfg.grpo, self.cfg.rollout
        index = self._consumed // (cfg.train.global_batch_size * self.updates)  # rollout number
        skip = (self._consumed // cfg.train.global_batch_size) % self.updates  # resumed mid-rollout
        first = index * self.prompts_per_rollout + env.dp_rank * self.local_prompts
        prompts = [self.stream[first + i] for i in range(self.local_prompts)]
        if not self._synced:
            t0 = time.perf_counter()
            self.engine.sync_weights(self.model)
            self._phase["sync_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = self._generate(prompts, first)
        self._phase["generate_s"] += time.perf_counter() - t0
        self._synced = cfg.rollout.engine == "native"  # the next update changes the weights

        t0 = time.perf_counter()
        texts = [self.stream.decode(o.token_ids) for o in outs]
        samples = [Sample(record=prompts[i // self.group].record, completion=texts[i],
                          token_ids=list(o.token_ids)) for i, o in enumerate(outs)]
        scored = self.rewards(samples)
        self._phase["score_s"] += time.perf_counter() - t0
        total = scored.total
        adv = group_advantages(total, self.group, g.std_normalize, g.std_eps)
        keep = (kept_rows(total, self.group) if g.filter_equal_groups
                else torch.ones(len(outs), dtype=torch.bool))

        rows = make_rows([o.prompt_ids for o in outs], [list(o.token_ids) for o in outs], cfg.train.seq_len,
                         self.pad_id, [list(o.logprobs) for o in outs]
                         if self.off_policy and g.old_logprobs == "rollout" else None,
                         [o.routed_experts for o in outs] if g.routing_replay else None)
        kept = [i for i in range(len(outs)) if bool(keep[i])]
        steps = []
        for slots in spread(kept, self.updates, self.rows_per_step):
            step = _select(rows, adv, slots, self.pad_id)
            steps.append([{k: v[j:j + self.mbs] for k, v in step.items()}
                          for j in range(0, self.rows_per_step, self.mbs)])
        if self.off_policy and g.old_logprobs == "recompute":
            t0 = time.perf_counter()
            steps = [[self._with_old_logprobs(b) for b in step] for step in steps]
            self._phase["old_logprobs_s"] += time.perf_counter() - t0
        self._steps = steps[skip:]
        self._stats = self._statistics(outs, scored, keep)
        if self.eval_set is not None and index % r.eval_every == 0:
            t0 = time.perf_counter()
            self._eval_stats = self.evaluate()  # logged once, on the step that made this rollout
            self._phase["eval_s"] += time.perf_counter() - t0
        if r.save_every and index % r.save_every == 0:  # named by the trainer's step it starts at
            self._save(self._step + 1 - skip, prompts, outs, texts, scored, adv, keep)

    def _generate(self, prompts: list[Prompt], first: int) -> list:
        """grpo.group_size completions of each prompt, group after group. native / hf: one engine call
        per prompt, seeded by train.seed and the prompt's stream position, so the samples do not
        depend on the layout (dp2 samples what one process does) nor on the rest of the batch; vllm:
        one call for all (its throughput is the batch), seeded by the rollout's first prompt.

        One batched native call with a seed per row (`SamplingParams.row_seeds`) was 3.6-4x faster on
        CPU (128 rows: 15-18 s against 54-75 s for 16 calls, loaded VM) but is not used: the logits of
        a 128-row call and of tp2's gathered vocabulary halves differ from the per-group calls' in the
        last bits, and on a near-uniform 152K distribution (an untrained model) that moved one sampled
        token, so tp2 no longer sampled what one process does (tests/parallel/test_rollout_layouts.py)."""
        from megaqwen.generate import SamplingParams

        g, r = self.cfg.grpo, self.cfg.rollout

        def params(position: int) -> SamplingParams:
            seed = (self.cfg.train.seed * 1_000_003 + position * 7919) % 2**62
            return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                  top_k=r.top_k, stop_token_ids=self.stop_ids, seed=seed,
                                  return_routed_experts=g.routing_replay)

        if r.engine == "vllm":
            return self.engine.generate([p.ids for p in prompts for _ in range(self.group)], params(first))
        return [o for i, p in enumerate(prompts) for o in self.engine.generate([p.ids] * self.group,
                                                                               params(first + i))]

    def evaluate(self) -> dict[str, float]:
        """`rollout/eval_*`: the policy on the fixed evaluation set (`EvalSet.run`, every rank alike)."""
        r = self.cfg.rollout
        return self.eval_set.run(self.engine, self.rewards, self.cfg.grpo.max_new_tokens, self.stop_ids,
                                 r.eval_samples, r.temperature, r.top_p, r.top_k,
                                 seed=eval_seed(self.cfg.train.seed)).metrics()

    def _with_old_logprobs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch with `old_logprobs`: the policy's log-probabilities of its labels now."""
        from megaqwen.train.reference import ReferenceModel

        if self._reference_like is None:  # the policy, run as the frozen reference is run
            self._reference_like = ReferenceModel(self.model, self.env, self.cfg)
        was_training = self.model.training
        self.model.eval()
        try:
            old = self._reference_like.token_logprobs(batch)
        finally:
            self.model.train(was_training)
        return {**batch, "old_logprobs": old.to(batch["labels"].device).float()}

    # -- metrics and saved rollouts -----------------------------------------------------------

    def _statistics(self, outs, scored, keep: torch.Tensor) -> dict[str, float]:
        """Global (all dp ranks) statistics of this rollout, `rollout/*` names."""
        from megaqwen.train.grpo import equal_groups

        total = scored.total.double()
        length = torch.tensor([float(len(o.token_ids)) for o in outs], dtype=torch.float64)
        stopped = torch.tensor([float(o.finish_reason == "stop") for o in outs], dtype=torch.float64)
        groups_equal = equal_groups(scored.total, self.group).double()
        sums = [float(len(outs)), total.sum(), (total * total).sum(), length.sum(), stopped.sum(),
                float(groups_equal.numel()), groups_equal.sum(), float((~keep).sum())]
        names = sorted(scored.components)
        for k in names:  # a component's mean over the samples it applies to
            v = scored.components[k].double()
            ok = ~torch.isnan(v)
            sums += [ok.sum().double(), torch.where(ok, v, 0.0).sum()]
        vec = par.dp_sum(torch.tensor([float(x) for x in sums], dtype=torch.float64, device=self.env.device),
                         self.env.mesh).cpu().tolist()
        n, s, s2, ln, st, ng, ge, dropped = vec[:8]
        mean = s / n
        out = {"rollout/reward_mean": mean, "rollout/reward_std": math.sqrt(max(s2 / n - mean * mean, 0.0)),
               "rollout/response_length": ln / n, "rollout/stop_fraction": st / n,
               "rollout/equal_groups": ge / ng, "rollout/rows_dropped": dropped,
               "rollout/prompts": ng}
        for i, k in enumerate(names):
            count, total_k = vec[8 + 2 * i], vec[9 + 2 * i]
            if count:
                out[f"rollout/reward/{k}"] = total_k / count
        if "math" in scored.components:
            count, right = vec[8 + 2 * names.index("math")], vec[9 + 2 * names.index("math")]
            if count:
                out["rollout/accuracy"] = right / count
        return out

    def _save(self, step: int, prompts, outs, texts, scored, adv, keep) -> None:
        """out_dir/rollouts/step_<first step>.jsonl: every dp rank's rows (gathered to rank 0)."""
        import torch.distributed as dist

        lines = []
        for i, o in enumerate(outs):
            p = prompts[i // self.group]
            lines.append(json.dumps({
                "prompt_line": p.line, "group": i // self.group, "prompt": self.stream.decode(p.ids),
                "record": p.record, "completion": texts[i], "token_ids": list(map(int, o.token_ids)),
                "finish_reason": o.finish_reason, "reward": float(scored.total[i]),
                "components": {k: (None if math.isnan(float(v[i])) else float(v[i]))
                               for k, v in scored.components.items()},
                "advantage": float(adv[i]), "kept": bool(keep[i]), "dp_rank": self.env.dp_rank},
                ensure_ascii=False))
        mesh = self.env.mesh
        if mesh is not None and self.env.dp_size > 1:
            gathered: list[list[str] | None] = [None] * self.env.dp_size
            dist.all_gather_object(gathered, lines, group=mesh.dp_group)
            lines = [x for part in gathered for x in part or []]
        if self.env.rank != 0:
            return
        folder = Path(self.cfg.train.out_dir) / ROLLOUT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"step_{step:07d}.jsonl").write_text("".join(x + "\n" for x in lines))

