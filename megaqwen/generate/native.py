"""The native engine: our model with a KV cache (prefill + decode), on the trainer's own modules.

Layout of a batch: prompts are LEFT-padded to the longest (B, L); each row's positions count from 0
at its first real token (`position = slot - padding`), padding slots are invalid keys (never
attended). Prefill runs the padded prompts once through `model(..., document_ids=CachedAttention)`
(the cache step object rides in the attention-metadata slot, see `megaqwen.kernels.attention`);
each decode step feeds one token per live row at its own next position. Rows that finish (stop
token) are dropped from the cache, so the later steps cost only what is still running.

Parallel layouts: the model is used in place, eval mode, no grad, under the trainer's autocast.
- tp: every rank of the tp group calls `generate` with the same prompts and params; the
  vocab-parallel logits are all-gathered over the group (`tp_group`, default the group the plan
  gave the model's loss) and every rank samples the same tokens from the same seeded generator.
- dp replicas (DDP, ZeRO-1/2): each rank generates its own prompts independently.
- FSDP2 / ZeRO-3: parameters are gathered inside every forward, so all ranks of `sync_group` must
  run the same number of forwards: with `sync_group` no row is dropped and the loop runs until every
  rank of the group is done (one all-reduce per step).
- compiled layers (parallel.compile) run eagerly during generation (no per-step recompiles).
- sequence parallelism, context parallelism and pipeline stages are refused (a decode step is one
  token; a stage lacks the embedding or head): generate with sp off and cp = pp = 1, or use vllm.
- expert parallelism (ep > 1) is refused: the all-to-all dispatch would need every ep rank in
  lockstep, and `full_hf_weights` sees only this rank's experts.
MoE models: with `SamplingParams.return_routed_experts` each completion carries the experts every
sparse layer chose for the tokens fed (the model's `recording_routing`), for routing replay.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from megaqwen.generate.api import Completion, SamplingParams
from megaqwen.generate.sampling import sample_next
from megaqwen.kernels.attention import KVCache
from megaqwen.parallel.collectives import gather_from_sp
from megaqwen.parallel.tensor_parallel import SequenceParallelRMSNorm, VocabParallelEmbedding

log = logging.getLogger(__name__)

PAD_ID = 0
"""Token id written into padding slots (masked out: its value never matters)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DeepSpeed (`.module`) or torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def check_generation_layout(model: nn.Module) -> None:
    """Refuse, with the fix, layouts the native engine cannot decode with."""
    m = unwrap(model)
    cfg = getattr(m, "cfg", None)
    if cfg is None or not hasattr(m, "hidden_states"):
        raise TypeError(f"native generation needs a megaqwen model, got {type(m).__name__}")
    if cfg.head != "lm":
        raise ValueError(f"native generation needs an LM head; this model has head={cfg.head!r}")
    if m.model.embed_tokens is None or m.model.norm is None or \
            (m.lm_head is None and not cfg.tie_word_embeddings):
        raise ValueError("native generation needs the whole model on every rank: this is a pipeline "
                         "stage (pp > 1). Generate with pp=1, or use the vllm engine (engine=vllm)")
    for name, mod in m.named_modules():
        if getattr(mod, "dispatcher", None) is not None:
            raise ValueError(f"native generation does not support expert parallelism ({name} dispatches "
                             "tokens to other ranks); roll out from an ep=1 layout or use the vllm engine")
        cp_group = getattr(mod, "cp_group", None)
        if cp_group is not None and dist.get_world_size(cp_group) > 1:
            raise ValueError(f"native generation cannot run under context parallelism ({name} attends "
                             "over sequence shards); roll out from a cp=1 layout or use the vllm engine")
        if isinstance(mod, SequenceParallelRMSNorm) and name.endswith("layernorm") or \
                isinstance(mod, VocabParallelEmbedding) and mod.sequence_parallel:
            raise ValueError(f"native generation cannot run under sequence parallelism ({name}: a "
                             "decode step is one token, not divisible over tp ranks); set "
                             "parallel.sequence_parallel=false for rollouts or use the vllm engine")


class NativeEngine:
    """`Engine` over our model with a KV cache (module docstring: layout, parallelism)."""

    def __init__(self, model: nn.Module, tp_group: dist.ProcessGroup | None = None,
                 sync_group: dist.ProcessGroup | None = None, autocast_dtype: torch.dtype | None = None):
        check_generation_layout(model)
        self.model = model
        self.inner = unwrap(model)
        self.tp_group = tp_group if tp_group is not None else getattr(self.inner.criterion, "tp_group", None)
        self.sync_group = sync_group
        self.autocast_dtype = autocast_dtype
        self.stats = {"prefill_tokens": 0, "decode_steps": 0}

    def sync_weights(self, model: nn.Module) -> None:
        """No-op: the engine runs the trainer's modules in place (they must be the same model)."""
        if unwrap(model) is not self.inner:
            raise ValueError("NativeEngine.sync_weights got another model than the one it runs; "
                             "build a new engine for it")

    @property
    def device(self) -> torch.device:
        return self.inner.model.embed_tokens.weight.device

    def _last_logits(self, tokens_BT, positions_BT, meta) -> torch.Tensor:
        """(B, V) fp32 logits of each row's last position (gathered over tp)."""
        def head(model, h_BTH, _batch):
            return model.logits(h_BTH[:, -1])

        out = self.model(tokens_BT, position_ids=positions_BT, document_ids=meta, objective=head)
        logits = out.parts
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            logits = gather_from_sp(logits, self.tp_group, dim=-1)
        return logits.float()

    def _generator(self, seed: int | None) -> torch.Generator:
        if seed is None:
            draw = torch.randint(0, 2**62, (1,))
            if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
                dist.broadcast(draw, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
            seed = int(draw.item())
        return torch.Generator(self.device).manual_seed(seed)

    def _others_running(self, running: bool) -> bool:
        """Under `sync_group`: whether any rank of the group still has live rows."""
        flag = torch.tensor([int(running)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.sync_group)
        return bool(flag.item())

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        outs = [Completion(list(map(int, p))) for p in prompts]
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty (generation needs at least one token)")
        if not prompts and self.sync_group is None:
            return outs
        rows = [list(p) for p in prompts] or [[PAD_ID]]  # a rank with no prompts still steps (sync)
        was_training = self.inner.training
        self.inner.eval()
        amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        try:
            # layers compiled by the trainer (parallel.compile) run eagerly here: each decode step has
            # a new cache length, which would recompile them every step
            record = contextlib.nullcontext()
            if params.return_routed_experts:
                if not hasattr(self.inner, "recording_routing"):
                    raise ValueError(f"return_routed_experts: {type(self.inner).__name__} has no MoE routing "
                                     "to return (a dense model)")
                record = self.inner.recording_routing()
            with torch.no_grad(), amp, torch.compiler.set_stance("force_eager"), record as tape:
                self._decode(rows, params, outs, tape)
        finally:
            self.inner.train(was_training)
        return outs

    def _routes(self, tape: list, rows: int, width: int) -> torch.Tensor:
        """The forward just run's expert choices from the recording `tape` (emptied): (rows, width,
        num_layers, K) int16, -1 in dense layers."""
        cfg = self.inner.cfg
        k = cfg.num_experts_per_tok
        out = torch.full((rows, width, cfg.num_layers, k), -1, dtype=torch.int16)
        for layer, idx in tape:
            out[:, :, layer] = idx.view(rows, width, k).to("cpu", torch.int16)
        tape.clear()
        return out

    def _decode(self, rows: list[list[int]], params: SamplingParams, outs: list[Completion],
                tape: list | None = None) -> None:
        dev, b = self.device, len(rows)
        lengths = torch.tensor([len(r) for r in rows], device=dev)  # (B,)
        width = int(lengths.max())
        pad = width - lengths
        tokens = torch.full((b, width), PAD_ID, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            tokens[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        slot = torch.arange(width, device=dev)[None]
        valid = slot >= pad[:, None]
        positions = (slot - pad[:, None]).clamp(min=0)
        cache = KVCache(b, width + params.max_new_tokens, dev)
        logits = self._last_logits(tokens, positions, cache.step(positions, valid))
        self.stats["prefill_tokens"] += int(lengths.sum())
        routes: list[list[torch.Tensor]] = []  # per real row: (tokens, L, K) pieces, prompt first
        if tape is not None:
            prefill = self._routes(tape, b, width)
            routes = [[prefill[i, width - len(r):]] for i, r in enumerate(rows[:len(outs)])]
        live = torch.arange(b, device=dev)  # original row of each cache row
        done = torch.zeros(b, dtype=torch.bool, device=dev)  # only used without compaction (sync)
        next_pos = lengths.clone()
        stop = torch.tensor(params.stop_token_ids or [-1], device=dev)
        gen = None if params.is_greedy else self._generator(params.seed)
        if params.row_seeds is not None and not params.is_greedy:  # one generator per row
            if len(params.row_seeds) != len(outs):
                raise ValueError(f"{len(params.row_seeds)} row_seeds for {len(outs)} prompts")
            gen = [torch.Generator(dev).manual_seed(s) for s in params.row_seeds]
            gen += [torch.Generator(dev).manual_seed(0) for _ in range(b - len(gen))]  # a sync pad row
        n_real = len(outs)
        for step in range(params.max_new_tokens):
            tok, logp = sample_next(logits, params, [gen[i] for i in live.tolist()] if isinstance(gen, list)
                                    else gen)
            finished = torch.isin(tok, stop) | done
            for row, t, lp, fin, was in zip(live.tolist(), tok.tolist(), logp.tolist(),
                                            finished.tolist(), done.tolist()):
                if row < n_real and not was:
                    outs[row].token_ids.append(t)
                    outs[row].logprobs.append(lp)
                    if fin:
                        outs[row].finish_reason = "stop"
            if step == params.max_new_tokens - 1:
                break
            if self.sync_group is not None:  # keep every row; step while any rank is running
                done = finished
                if not self._others_running(not bool(done.all())):
                    break
            elif finished.any():
                keep = (~finished).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.keep(keep)
                live, tok, next_pos, done = live[keep], tok[keep], next_pos[keep], done[keep]
            positions = next_pos[:, None]
            logits = self._last_logits(tok[:, None], positions, cache.step(positions))
            if tape is not None:  # rows fed a token they will be scored on (not a finished row's)
                fed = self._routes(tape, len(live), 1)
                for j, (row, fin) in enumerate(zip(live.tolist(), done.tolist())):  # done: sync only
                    if row < n_real and not fin:
                        routes[row].append(fed[j])
            next_pos = next_pos + 1
            self.stats["decode_steps"] += 1
        for row, pieces in enumerate(routes):
            outs[row].routed_experts = torch.cat(pieces)
