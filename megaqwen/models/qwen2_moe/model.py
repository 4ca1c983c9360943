"""Qwen2-MoE decoder as plain single-device PyTorch, with Hugging Face (checkpoint) parameter names.

The Qwen2 decoder (attention, norms, RoPE, loss: imported from `megaqwen.models.qwen2.model`) with
the MLP of every sparse layer replaced by `SparseMoeBlock`:
    router     mlp.gate                 Linear H -> E, softmax, top-k (optionally renormalised)
    experts    mlp.experts.{e}.*_proj   E SwiGLU MLPs of moe_intermediate_size
    shared     mlp.shared_expert.*      one SwiGLU MLP of shared_expert_intermediate_size, scaled by
               mlp.shared_expert_gate   sigmoid(Linear H -> 1)
Which layers are sparse: `ModelConfig.is_sparse_layer` (decoder_sparse_step, mlp_only_layers);
the others keep the dense Qwen2 MLP of intermediate_size.

Legend: N tokens (B*T), H hidden, E experts, K top-k, A = N*K token->expert assignments.

Dispatch: the A assignments are sorted by expert, the experts run over their contiguous blocks of
rows (`megaqwen.kernels.moe`: a loop of GEMMs, padded bmm or torch._grouped_mm, never a loop over
tokens), and the weighted outputs are summed back per token with one index_add. Dropless unless
`moe_capacity_factor` > 0. Expert parallelism plugs in as the block's `dispatcher` (an all-to-all
to the ranks holding the experts); this file stays single-device.

Losses: the load-balancing loss (`MoELossParts.aux`, in the `moe_balance` form of
`megaqwen.models.moe_balance`) and the router z-loss (`.z`) are returned next to the LM loss; the
trainer adds `router_aux_loss_coef * aux + router_z_loss_coef * z` to the LM mean.
Aux-loss-free balancing (DeepSeek-V3): with `moe_routing_bias_update_rate` > 0 each router has a
bias `mlp.gate.e_score_correction_bias` (E,) added to the probabilities for the top-k choice only;
`update_routing_bias` moves it after each optimizer step from the load counted in `load_E`.

Routing replay (online RL, `grpo.routing_replay`; "rollout routing replay", Ma et al. 2025,
arXiv:2510.11370): `recording_routing()` collects the experts every sparse layer chooses while the
generation engine runs; a forward whose `batch` carries `ROUTED_EXPERTS` (B, T, num_layers, K)
routes each token to those experts (-1: the router's own choice) with the weights of the current
router at them (softmax probabilities gathered, renormalised as `norm_topk_prob` says), so the
router still gets gradients and a policy update cannot move a token to other experts between
rollout and training. The replay stays on the blocks until the next forward sets it, so activation
recompute re-runs each layer on the same experts in backward (tested with full and selective
recompute, and under ep=2 against one process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaqwen.kernels.attention import AttentionMeta
from megaqwen.kernels.cross_entropy import LossParts
from megaqwen.kernels.moe import (
    capacity,
    combine,
    expert_flops,
    expert_mlp,
    permute,
    pick_backend,
    stack_experts,
    stacked_weights,
)
from megaqwen.kernels.registry import KernelOps
from megaqwen.models.config import ModelConfig
from megaqwen.models.moe_balance import BalanceStats, RoutingCounts, balance_loss, needs_step_counts
from megaqwen.models.outputs import ROUTED_EXPERTS, AuxTerm
from megaqwen.models.qwen2.model import (
    MLP,
    DecoderLayer,
    ParamInit,
    Qwen2ForCausalLM,
    RMSNorm,
    build_on_meta,
)


class RouterOut(NamedTuple):
    """One sparse layer's routing, kept for the auxiliary losses."""

    probs_NE: torch.Tensor
    """fp32 softmax over experts (with grad: the loss's differentiable factor)."""
    topk_NK: torch.Tensor
    """int64 chosen experts per token."""
    z_sum: torch.Tensor
    """fp32 scalar: sum over tokens of logsumexp(router logits)^2 (with grad, for the z-loss)."""
    layer: int = -1
    """Decoder layer index of the block (keys the balancing statistics)."""
    rows: int = 1
    """B: rows (sequences) the N tokens come from, N = B * T (the sequence-wise loss's rows)."""


class MoELossParts(NamedTuple):
    """LM loss pieces (exactly `LossParts`' `sum` and `count`, so code written for LossParts keeps
    working) plus this forward's router losses, not yet multiplied by their coefficients."""

    sum: torch.Tensor
    count: torch.Tensor
    aux: torch.Tensor
    """fp32 scalar: the load-balancing loss of this forward in the `moe_balance` form (micro_batch:
    HF's `aux_loss`, Switch/GShard over all sparse layers of the forward)."""
    z: torch.Tensor | None = None
    """fp32 scalar: router z-loss, mean over the tokens of all sparse layers (ST-MoE)."""

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)

    @property
    def lm(self) -> LossParts:
        return LossParts(self.sum, self.count)


def _mlp(cfg: ModelConfig, ops: KernelOps, width: int) -> MLP:
    return MLP(replace(cfg, intermediate_size=width), ops)


BIAS = "e_score_correction_bias"
"""Name of the aux-free routing bias on the router (`mlp.gate.e_score_correction_bias`, the name
DeepSeek-V3's HF checkpoints use for the same thing)."""

# Dispatcher: dispatcher(x_AH, counts_E, compute) -> y_AH. Gets this rank's assignments sorted by
# expert with per-expert counts over all E experts, runs `compute(x_rows, counts_local)` on the rows
# of the experts held here, returns outputs in the input's order. Expert parallelism installs an
# all-to-all one (megaqwen.parallel.expert_parallel); the default runs every expert locally.
Dispatcher = Callable[[torch.Tensor, torch.Tensor, Callable], torch.Tensor]


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob, self.capacity_factor = cfg.norm_topk_prob, cfg.moe_capacity_factor
        self.ops = ops
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        if cfg.moe_routing_bias_update_rate > 0:  # not trained by gradients: see update_routing_bias
            bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
            self.gate.register_parameter(BIAS, bias)
        # keyed by global expert index: expert parallelism deletes the ones a rank does not hold
        self.experts = nn.ModuleDict({str(e): _mlp(cfg, ops, cfg.moe_intermediate_size)
                                      for e in range(cfg.num_experts)})
        si = cfg.shared_expert_intermediate_size
        self.shared_expert = _mlp(cfg, ops, si) if si else None
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if si else None
        self.expert_backend = "auto"
        """kernels.moe backend: auto | loop | bmm | grouped_mm."""
        self.dispatcher: Dispatcher | None = None
        self.expert_flops = 0
        """Forward FLOPs of the routed experts run on this rank so far (`compute` adds them; padding
        rows included, recomputed forwards too): what expert parallelism divides."""
        self._stacked: dict[str, torch.Tensor] = {}
        """Projection name -> the (E_local, ...) storage the experts' weights are views of."""
        self.layer_index = -1
        """Decoder layer index (set by the decoder): tags this block's `RouterOut`."""
        self.router_out: list[RouterOut] | None = None
        """Set by the model around its forward: where this block appends its routing. An attribute,
        not a call argument: wrappers (FSDP2) may rebuild argument lists, losing the appends."""
        self.routing_record: list[tuple[int, torch.Tensor]] | None = None
        """Set by `recording_routing`: every forward appends (layer index, chosen experts (N, K))."""
        self.routing_replay: torch.Tensor | None = None
        """(N, K) experts the next forwards route to (-1: the router's choice); set by the model's
        forward from its batch and kept until the next one, so a recomputed forward replays too."""
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the load counters (`load_E` assignments per expert before dropping, `dropped`
        assignments beyond capacity) that forwards accumulate for metrics and the bias update."""
        self.load_E: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None

    @property
    def routing_bias(self) -> torch.Tensor | None:
        return getattr(self.gate, BIAS, None)

    def route(self, x_NH: torch.Tensor) -> tuple[RouterOut, torch.Tensor]:
        """-> (routing, weights (N, K) in x's dtype). With the aux-free bias the top-k choice uses
        probs + bias and the weights the unbiased probs (DeepSeek-V3)."""
        logits = self.gate(x_NH).float()  # (N, E)
        probs = F.softmax(logits, dim=-1)
        bias = self.routing_bias
        if bias is None:
            w, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        else:
            idx = torch.topk(probs + bias.float(), self.top_k, dim=-1).indices
            w = probs.gather(1, idx)
        if self.routing_replay is not None:
            replay = self.routing_replay.to(idx.device, torch.long)
            if replay.shape != idx.shape:
                raise ValueError(f"routing replay of layer {self.layer_index}: {tuple(replay.shape)} expert "
                                 f"choices for {tuple(idx.shape)} routed (tokens, top-k); the batch's "
                                 f"{ROUTED_EXPERTS} must be (B, T, num_layers, K) of the same rows")
            idx = torch.where(replay >= 0, replay, idx)
            w = probs.gather(1, idx)
        if self.routing_record is not None:
            self.routing_record.append((self.layer_index, idx.detach()))
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        z_sum = torch.logsumexp(logits, dim=-1).square().sum()
        return RouterOut(probs, idx, z_sum), w.to(x_NH.dtype)

    def local_experts(self) -> list[nn.Module]:
        return list(self.experts.values())

    def compute(self, x_AH: torch.Tensor, counts) -> torch.Tensor:
        """Rows grouped by the experts held here (in key order), counts per expert -> outputs. The
        loop calls each expert module (also on zero rows: every expert gets a grad), which keeps
        module hooks working (FSDP2 units); the stacked backends read the weights stacked once
        (`kernels.moe.stack_experts`: no copy per call). Adds the forward FLOPs it runs to
        `expert_flops` (every dispatcher calls this, so the count is what this rank executed)."""
        experts = self.local_experts()
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        w = experts[0].gate_proj.weight  # (I, H): I is this rank's slice under expert TP
        self.expert_flops += expert_flops(sum(counts), w.shape[1], w.shape[0])
        if _wrapped(w) or pick_backend(self.expert_backend, x_AH, w.shape[1], w.shape[0]) == "loop":
            return torch.cat([m(x) for m, x in zip(experts, x_AH.split(counts))])
        stacked = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            ws = [getattr(m, name).weight for m in experts]
            self._stacked[name] = stack_experts(ws, self._stacked.get(name))
            stacked.append(stacked_weights(ws, self._stacked[name]))
        return expert_mlp(x_AH, counts, *stacked, self.ops.swiglu, self.expert_backend)

    def experts_forward(self, x_NH: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch: sum_k w[n, k] * expert_{idx[n, k]}(x[n]) (dropped assignments add 0)."""
        n, k = idx_NK.shape
        perm = permute(idx_NK, self.num_experts, capacity(self.capacity_factor, n, k, self.num_experts))
        if not _recomputing():  # the load was counted on the first pass already
            self.load_E = perm.load_E if self.load_E is None else self.load_E + perm.load_E
            if self.capacity_factor > 0:
                self.dropped = perm.dropped if self.dropped is None else self.dropped + perm.dropped
        x_A = x_NH.index_select(0, perm.order_A // k)  # (A, H) expert-major
        y_A = (self.dispatcher or _local)(x_A, perm.counts_E, self.compute)
        return combine(y_A, w_NK, perm.order_A, n)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        x = x_BTH.reshape(-1, x_BTH.shape[-1])  # (N, H)
        routing, w = self.route(x)
        if self.router_out is not None:
            rows = x_BTH.shape[0] if x_BTH.dim() == 3 else 1
            self.router_out.append(routing._replace(layer=self.layer_index, rows=rows))
        y = self.experts_forward(x, routing.topk_NK, w)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view_as(x_BTH)

    @torch.no_grad()
    def update_routing_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """Aux-free balancing step: bias_e += rate * sign(mean load - load_e) (DeepSeek-V3)."""
        bias = self.routing_bias
        if bias is not None:
            load = load_E.float()
            bias.add_(rate * torch.sign(load.mean() - load).to(bias.device, bias.dtype))


def _recomputing() -> bool:
    """True while activation recomputation re-runs a forward inside backward (the autograd engine is
    executing a graph task): the load was counted on the first pass already."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _wrapped(w: torch.Tensor) -> bool:
    """A weight held by a wrapper (FSDP2's DTensor shards): only the module's forward may read it."""
    return type(w).__name__ == "DTensor"


def _local(x_AH: torch.Tensor, counts_E: torch.Tensor, compute: Callable) -> torch.Tensor:
    return compute(x_AH, counts_E)


class MoeDecoderLayer(DecoderLayer):
    """Qwen2's decoder layer; its MLP is a SparseMoeBlock on sparse layers."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, sparse: bool):
        super().__init__(cfg, ops)
        if sparse:
            self.mlp = SparseMoeBlock(cfg, ops)


class MoeDecoder(nn.Module):
    """`model.*` in HF naming, as Qwen2's Decoder. Any part may be None (PP stages)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): MoeDecoderLayer(cfg, ops, cfg.is_sparse_layer(i))
                                     for i in range(cfg.num_layers)})
        for i, layer in self.layers.items():
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp.layer_index = int(i)
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


def load_balancing_loss(routing: list[RouterOut], num_experts: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss exactly as HF's `load_balancing_loss_func` (no padding mask):
    E * sum_e f_e * P_e, f_e = share of top-k assignments to expert e and P_e = mean router
    probability of e, both averaged over every token of every sparse layer together."""
    if not routing:
        return torch.zeros((), dtype=torch.float32)
    rows = sum(r.probs_NE.shape[0] for r in routing)
    counts = sum(torch.bincount(r.topk_NK.reshape(-1), minlength=num_experts) for r in routing)
    probs = sum(r.probs_NE.sum(dim=0) for r in routing)
    return num_experts * torch.sum((counts.float() / rows) * (probs / rows))


def router_z_loss(routing: list[RouterOut]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over every token of every sparse layer of logsumexp(logits)^2."""
    if not routing:
        return torch.zeros((), dtype=torch.float32)
    return sum(r.z_sum for r in routing) / sum(r.probs_NE.shape[0] for r in routing)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    decoder_cls = MoeDecoder

    def hidden_states(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                      attn: AttentionMeta | None = None, layers: Iterable[int] | None = None,
                      final_norm: bool = True, records: list | None = None) -> torch.Tensor:
        """As Qwen2's; each sparse layer appends its `RouterOut` to `records` when given (only during
        this call: a forward re-run by activation recomputation appends nothing)."""
        blocks = list(self.moe_blocks().values())
        for block in blocks:
            block.router_out = records
        try:
            return super().hidden_states(tokens, position_ids, attn, layers, final_norm)
        finally:
            for block in blocks:
                block.router_out = None

    balance: BalanceStats | RoutingCounts | None = None
    """Set by the trainer around one step (`megaqwen.train.moe_balance`): the counting pre-pass's
    collector, then the step's routing counts the load-balancing forms need from other forwards."""

    def balance_counter(self, micro_batches: int, dims) -> RoutingCounts | None:
        """The trainer's counting pre-pass collector (`megaqwen.train.moe_balance`) when this step's
        trained balancing form needs routing counts beyond one forward's (`dims`: the layout's dp, cp
        and pp degrees); None when each forward's own counts are exact or no loss is trained."""
        c = self.cfg
        if c.router_aux_loss_coef <= 0 or c.moe_balance == "aux_free":
            return None
        if not needs_step_counts(c.moe_balance, micro_batches, dims.dp, dims.cp, dims.pp):
            return None
        return RoutingCounts(c.num_experts, c.moe_balance)

    def aux_terms(self, records: list[RouterOut], partial: bool = False) -> dict[str, AuxTerm]:
        """`aux_loss` (the `moe_balance` form of load balancing, `router_aux_loss_coef`; 0 under
        aux_free) and `z_loss` (ST-MoE, `router_z_loss_coef`) of one forward's routing. `partial` (a
        pipeline stage's layers): each term's share, the stages' shares adding up to the whole model's
        (`megaqwen.models.moe_balance`); HF's micro_batch form has a share only with the step's
        counts (`balance`), else only the z-loss is returned on every stage."""
        c = self.cfg
        state = self.balance
        if isinstance(state, RoutingCounts):
            state.observe(records)
        stats = state if isinstance(state, BalanceStats) else None
        sparse = sum(c.is_sparse_layer(i) for i in range(c.num_layers))
        aux = balance_loss(records, c.moe_balance, c.num_experts, sparse, partial, stats)
        coef = 0.0 if c.moe_balance == "aux_free" else c.router_aux_loss_coef
        if partial:  # the same names on every stage, a zero share where it has no sparse layer
            if not records:
                z = torch.zeros((), device=next(self.parameters()).device)  # no host/device mix
            else:
                z = sum(r.z_sum for r in records) / (records[0].probs_NE.shape[0] * sparse)
        else:
            z = router_z_loss(records)
        device = records[0].probs_NE.device if records else z.device
        out = {"z_loss": AuxTerm(z.to(device), c.router_z_loss_coef)}
        if aux is not None:
            out["aux_loss"] = AuxTerm(aux.to(device), coef)
        return out

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | AttentionMeta | None = None,
                objective: Callable | None = None, batch: dict | None = None):
        """As Qwen2's forward, but with labels the result is `MoELossParts` (LM loss + aux loss).
        A `batch` with `ROUTED_EXPERTS` replays that routing (module docstring); any other call
        routes freely."""
        self.replay_routing(None if batch is None else batch.get(ROUTED_EXPERTS))
        if objective is not None or labels is None:
            return super().forward(tokens, labels, position_ids, document_ids, objective, batch)
        position_ids, attn = self.prepare_inputs(tokens, position_ids, document_ids)
        routing: list[RouterOut] = []
        h = self.hidden_states(tokens, position_ids, attn, records=routing)
        if self.model.norm is None:
            return h
        lm = self.loss(h, labels)
        aux = self.aux_terms(routing)
        return MoELossParts(lm.sum, lm.count, aux["aux_loss"].value.to(lm.sum.device),
                            aux["z_loss"].value.to(lm.sum.device))

    def replay_routing(self, routed_BTLK: torch.Tensor | None) -> None:
        """Route the next forwards' tokens to `routed_BTLK[:, :, layer]` (-1: the router's choice) in
        every sparse layer of this model (stage); None: route freely."""
        for block in self.moe_blocks().values():
            block.routing_replay = None if routed_BTLK is None else \
                routed_BTLK[:, :, block.layer_index].reshape(-1, routed_BTLK.shape[-1])

    @contextlib.contextmanager
    def recording_routing(self) -> Iterator[list[tuple[int, torch.Tensor]]]:
        """Within: every sparse layer's forward appends (layer index, chosen experts (N, K)) to the
        yielded list, in call order (the generation engine reads it after each forward)."""
        tape: list[tuple[int, torch.Tensor]] = []
        blocks = list(self.moe_blocks().values())
        for block in blocks:
            block.routing_record = tape
        try:
            yield tape
        finally:
            for block in blocks:
                block.routing_record = None

    def param_init(self, name: str) -> ParamInit:
        """As Qwen2's; the aux-free routing bias starts at zero."""
        return ParamInit("zeros") if name.endswith(BIAS) else super().param_init(name)

    def moe_blocks(self) -> dict[str, SparseMoeBlock]:
        """FQN prefix (`model.layers.3.mlp`) -> sparse block, for this stage's layers."""
        return {f"model.layers.{i}.mlp": layer.mlp for i, layer in self.model.layers.items()
                if isinstance(layer.mlp, SparseMoeBlock)}


def build_model(cfg: ModelConfig, ops: KernelOps | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = None) -> Qwen2MoeForCausalLM:
    """As `megaqwen.models.qwen2.build_model`: built on meta, then materialised and initialised
    (router, experts and shared-expert gate: Normal(0, init_std)) unless `device` is meta."""
    return build_on_meta(Qwen2MoeForCausalLM, cfg, ops, device, dtype, seed)
