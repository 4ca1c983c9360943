"""MoE load-balancing losses: one formula per `ModelConfig.moe_balance` form, from a forward's routing.

Legend: E experts, K top-k, L sparse layers of the whole model, N tokens, B rows (sequences), T tokens
per row. Every form is the Switch/GShard product E * sum_e f_e * P_e with f_e = assignments to e /
tokens (sums to K) and P_e = mean router probability of e, over every token (no padding mask, as HF),
so a perfectly balanced router scores K in each form and one coefficient means the same in all:

    micro_batch   HF's `load_balancing_loss_func`: f and P over one micro-batch and all sparse layers
                  pooled (one product for the whole model), averaged over micro-batches and dp ranks
    global_batch  Qwen's (Qiu et al. 2025, "Demons in the Detail"; Megatron-Core's global aux loss):
                  per layer, f counted over the whole optimizer step (every micro-batch, every dp x cp
                  rank), times P over the same tokens; the mean over layers
    sequence      DeepSeek-V2/V3's sequence-wise loss: per layer and per row; mean over rows and layers
    aux_free      nothing trained (the routing bias balances); logged as micro_batch

Exactness under splits. For fixed f each form is linear in the probability sums S_e = sum_n p_ne, so
a forward that holds only part of the tokens (a micro-batch, a cp shard, a pipeline stage's layers)
contributes `E * sum_e f_e * S_e_local / N` once f (a count over *all* the tokens) is known. The
counts of a whole step are known only after its last forward, so the trainer runs a counting pre-pass
(`megaqwen.train.moe_balance`: a no-grad forward of the step's micro-batches, counts reduced over the
ranks) and hands them in as `BalanceStats`; each micro-batch's term is then its exact share of the
whole-step loss, scaled by `replicas` (what the trainer's mean over micro-batches and dp x cp ranks
divides it by), so the trained gradient and the logged value equal one process's over the global
batch. Without stats (one process, evaluation, an HF parity forward) the forward's own counts are used,
which is the same thing when the forward holds the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALL_LAYERS = -1
"""`BalanceStats.counts` key of the micro_batch form (pooled over every sparse layer)."""


def row_counts(topk_NK: torch.Tensor, rows: int, num_experts: int) -> torch.Tensor:
    """(B, E) int64 assignments per row and expert of one layer's routing (N = B * T tokens)."""
    k = topk_NK.shape[-1]
    idx_BA = topk_NK.reshape(rows, -1)  # (B, T*K)
    out = torch.zeros(rows, num_experts, dtype=torch.int64, device=topk_NK.device)
    return out.scatter_add_(1, idx_BA, torch.ones_like(idx_BA)) if k else out


@dataclass
class BalanceStats:
    """Routing counts over more tokens than one forward holds (from the counting pre-pass)."""

    mode: str
    """The moe_balance form these counts serve."""
    counts: dict[int, list[torch.Tensor]]
    """global_batch: layer -> [(E,) over the step]; micro_batch: ALL_LAYERS -> [(E,) per micro-batch,
    every layer and cp shard]; sequence: layer -> [(B, E) per micro-batch, summed over cp shards]."""
    tokens: list[float]
    """Tokens behind one layer's counts: global_batch [step total]; micro_batch [per micro-batch];
    sequence [row length T per micro-batch]."""
    replicas: float
    """The trainer averages a micro-batch's aux term over this many (micro-batches x) ranks."""
    cursor: dict[int, int] = field(default_factory=dict)
    """Per key: the micro-batch the next forward of it is (forwards run in micro-batch order)."""

    def take(self, key: int) -> tuple[torch.Tensor, float]:
        """(counts, tokens) for the next forward through `key` (global_batch: always the step's)."""
        if self.mode == "global_batch":
            return self.counts[key][0], self.tokens[0]
        i = self.cursor.get(key, 0)  # key: a layer (micro_batch: the forward's first sparse layer)
        self.cursor[key] = i + 1
        per_micro = self.counts[ALL_LAYERS if self.mode in ("micro_batch", "aux_free") else key]
        if i >= len(per_micro):
            raise RuntimeError(f"balance statistics for {len(per_micro)} micro-batches, asked for "
                               f"micro-batch {i + 1} through layer {key}")
        return per_micro[i], self.tokens[i]


class RoutingCounts:
    """The counting pre-pass's collector: set as the model's `balance` state, the model's `aux_terms`
    hands it every forward's routing; per layer, one (B, E) row-count tensor per micro-batch."""

    def __init__(self, num_experts: int, mode: str):
        self.width, self.mode = num_experts, mode
        """width: E, the columns of every count."""
        self.by_layer: dict[int, list[torch.Tensor]] = {}

    def observe(self, records) -> None:
        for r in records:
            self.by_layer.setdefault(r.layer, []).append(row_counts(r.topk_NK, r.rows, self.width))


def needs_step_counts(mode: str, micro_batches: int, dp: int, cp: int, pp: int) -> bool:
    """Whether form `mode`'s exact value needs counts beyond one forward's: the global form over more
    than one micro-batch or rank, HF's pooled form over cp shards or pipeline stages, the sequence
    form over cp shards (its rows are split)."""
    if mode == "global_batch":
        return micro_batches * dp * cp > 1
    if mode == "micro_batch":
        return pp > 1 or cp > 1
    return mode == "sequence" and cp > 1


def _product(counts_E: torch.Tensor, probs_sum_E: torch.Tensor, tokens: float, num_experts: int):
    return num_experts * torch.sum(counts_E.to(probs_sum_E) / tokens * (probs_sum_E / tokens))


def balance_loss(records, mode: str, num_experts: int, sparse_layers: int, partial: bool = False,
                 stats: BalanceStats | None = None) -> torch.Tensor | None:
    """fp32 scalar with grad: this forward's load-balancing term in form `mode` (its share of the
    whole model's when `partial`: a pipeline stage's layers; of the whole step's with `stats`).
    None where no exact value exists (micro_batch on a pipeline stage without the pre-pass)."""
    if not records:
        return None if partial and mode in ("micro_batch", "aux_free") and stats is None else \
            torch.zeros((), dtype=torch.float32)
    e, n_layers = num_experts, sparse_layers
    if mode in ("micro_batch", "aux_free"):
        probs = sum(r.probs_NE.sum(dim=0) for r in records)  # (E,) this forward's layers
        if stats is None:
            if partial:
                return None
            rows = sum(r.probs_NE.shape[0] for r in records)
            counts = sum(torch.bincount(r.topk_NK.reshape(-1), minlength=e) for r in records)
            return _product(counts, probs, rows, e)
        counts, tokens = stats.take(records[0].layer)
        return stats.replicas * _product(counts, probs, tokens * n_layers, e)
    total = None
    for r in records:
        if mode == "global_batch":
            if stats is None:
                term = _product(torch.bincount(r.topk_NK.reshape(-1), minlength=e), r.probs_NE.sum(0),
                                r.probs_NE.shape[0], e)
            else:
                counts, tokens = stats.take(r.layer)
                term = stats.replicas * _product(counts, r.probs_NE.sum(0), tokens, e)
        elif mode == "sequence":
            probs_BE = r.probs_NE.reshape(r.rows, -1, e).sum(dim=1)  # (B, E) this shard's rows
            if stats is None:
                counts_BE, t = row_counts(r.topk_NK, r.rows, e), r.probs_NE.shape[0] / r.rows
                scale = 1.0
            else:
                (counts_BE, t), scale = stats.take(r.layer), stats.replicas
            term = scale * e * torch.sum(counts_BE.to(probs_BE) / t * (probs_BE / t)) / r.rows
        else:
            raise ValueError(f"moe_balance={mode!r} is not a load-balancing form")
        total = term if total is None else total + term
    return total / n_layers
