"""A frozen reference model for objectives that compare the policy with where it started (DPO's
log-ratio, a KL penalty in RL): built with the policy's own plans, so it is sharded like the policy
(tp/sp, pp stages, cp, ep; FSDP2 over dp with `dp_mode=fsdp`), never trained.

    ref = ReferenceModel.build(cfg, env, ops, plan)     # when the objective has needs_reference
    batch["reference_logprobs"] = ref.token_logprobs(micro_batch)   # (B, T) before the policy pass

Weights come from `train.reference_from` (an HF folder or a native checkpoint), by default from
`train.init_from` (the policy's starting point: also right when the run resumes, as the policy has
moved since). Under pipeline parallelism the reference runs its stages forward only and the result
is on the ranks holding the last stage, where the policy's objective runs; under context
parallelism each rank's shard is gathered back to the full sequence, which the policy's pass
shards again with the rest of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from megaqwen.parallel import setup as par
from megaqwen.train.objective import REFERENCE_FIELD  # noqa: F401  (the batch field it fills)

log = logging.getLogger(__name__)



def _token_logprobs(model, h: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.token_logprobs(h, batch["labels"])


def reference_source(cfg) -> str:
    """Where the reference model's weights come from: `train.reference_from`, else `train.init_from`;
    a ValueError naming both when neither is set."""
    source = cfg.train.reference_from or cfg.train.init_from
    if not source:
        raise ValueError(f"train.objective={cfg.train.objective} needs a reference model: set "
                         "train.reference_from (an HF folder or a native checkpoint) or train.init_from")
    return source


class ReferenceModel:
    def __init__(self, model, env: par.DistEnv, cfg, pipe=None):
        self.model, self.env, self.cfg, self.pipe = model, env, cfg, pipe

    @classmethod
    def build(cls, cfg, env: par.DistEnv, ops, plan=None) -> ReferenceModel:
        from megaqwen.train.build import build_model_for_run, build_pipeline

        source = reference_source(cfg)
        # the native build path: sharded by our own plans under every engine (a frozen model has no
        # optimizer state for DeepSpeed to partition)
        ref_cfg = replace(cfg, train=replace(cfg.train, init_from=source, engine="native"))
        model, shards = build_model_for_run(ref_cfg, env, ops, resuming=False, plan=plan)
        model.requires_grad_(False)
        model.eval()
        pipe = build_pipeline(cfg, env, plan, model, shards)
        log.info("reference model: %s, frozen, sharded like the policy", source)
        return cls(model, env, cfg, pipe)

    @torch.no_grad()
    def token_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) fp32 log-probabilities of the micro-batch's labels under the reference (0 where
        the label is -100, and on pp ranks without the last stage, which do not use them)."""
        from megaqwen.train.forward import autocast_ctx, forward_step, model_inputs

        cfg, env = self.cfg, self.env
        labels = batch["labels"]
        with autocast_ctx(cfg.train.dtype, env.device):
            if self.pipe is not None:
                inputs = model_inputs(batch, cfg, env.device)
                out = self.pipe.forward_only(inputs, _token_logprobs, ("labels",), cfg.data.document_mask)
                if out is None:
                    return torch.zeros(labels.shape, dtype=torch.float32, device=env.device)
            else:
                cp_group = env.mesh.group("cp") if env.mesh is not None and env.dims.cp > 1 else None
                out = forward_step(self.model, batch, cfg, env.device, _token_logprobs, cp_group).parts
        if env.mesh is not None and env.dims.cp > 1:  # this rank's zig-zag shard -> the full sequence
            from megaqwen.parallel.context_parallel import gather_sequence

            out = gather_sequence(out.contiguous(), env.mesh.group("cp"))
        return out.float()


class PrecomputedReference:
    """`dpo.precompute_reference`: the reference's log-probabilities of every micro-batch the run
    will train on, computed once before the first step, after which the reference model is freed,
    so training holds no second copy of the weights (nor the reference's forward activations). Kept on
    the host at the valid labels only (fp32: 4 bytes per response token of this rank's rows) and
    handed out in the order the steps ask for them (the data stream is deterministic from the
    consumed-samples position, so a second iterator replays it)."""

    def __init__(self, values: list[torch.Tensor], device: torch.device):
        from collections import deque

        self._values, self.device = deque(values), device

    @classmethod
    def compute(cls, reference: ReferenceModel, micro_batches, count: int) -> PrecomputedReference:
        from megaqwen.kernels.cross_entropy import IGNORE_INDEX

        values = []
        for _ in range(count):
            batch = next(micro_batches)
            lp = reference.token_logprobs(batch).cpu()
            values.append(lp[batch["labels"] != IGNORE_INDEX])
        log.info("reference log-probabilities precomputed for %d micro-batches (%.1f MiB on the host); "
                 "reference model freed", count, sum(v.numel() for v in values) * 4 / 2**20)
        return cls(values, reference.env.device)

    def token_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) as `ReferenceModel.token_logprobs` gave for this micro-batch (the next one in order)."""
        from megaqwen.kernels.cross_entropy import IGNORE_INDEX

        if not self._values:
            raise RuntimeError("dpo.precompute_reference: more micro-batches than were precomputed")
        labels = batch["labels"]
        out = torch.zeros(labels.shape, dtype=torch.float32)
        out[labels != IGNORE_INDEX] = self._values.popleft()
        return out.to(self.device)
