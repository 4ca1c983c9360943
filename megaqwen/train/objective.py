"""Training objectives: what a step minimises, as one contract for every path through the trainer.

An objective turns a micro-batch and the model's final hidden states into `ObjectiveParts(sum,
count, metrics)`: the objective summed over the micro-batch's units (valid tokens for `lm`), how many
units, and detached metric sums. The step's objective is `sum` over every micro-batch and rank
divided by the global unit count, so ignored tokens and uneven micro-batches weigh as in one process.
It asks the model only for what the model exposes to every objective:

    model.loss(h, labels)            -> LossParts(sum, count)   next-token cross-entropy (chunked,
                                                                vocab-parallel under tp)
    model.token_logprobs(h, labels)  -> (B, T) log p(label)     per-token log-probabilities
    label_logprobs(model, h, labels) -> the same, the head computed only at labelled positions
                                        when they are sparse (post-training; `labelled_rows`)
    sequence_sums(values, batch)     -> per-document sums       per-sequence (per packed document)
    row_sums(values, batch)          -> (B,) per-row sums       whole rows, summed over cp shards

The batch an objective gets holds the micro-batch's tensors (this cp rank's shard of the
per-token ones) and `cp_group` (None without context parallelism).

The model's auxiliary terms (MoE router losses: `megaqwen.models.outputs.AuxTerm`) are added by
`StepMeter`, by name, in one place, whether the step is pipelined or not; the meter also reduces
everything the step logs (`loss`, each aux term, each objective metric) over micro-batches,
pipeline stages and data-parallel ranks.

Where each path calls it:
- the trainer step (`megaqwen.train.loop.train_step`): `model(tokens, ..., objective=obj, batch=b)`
  through the DDP / FSDP2 / DeepSpeed wrapper's forward -> `ForwardOut(parts, aux)` -> `StepMeter.add`;
- the last pipeline stage (`megaqwen.parallel.pipeline.StageModule`): the same `obj(model, h, batch)`
  and `StepMeter.add`; earlier stages add their share of the aux terms;
- validation: the same objective's `sum` / `count`, no aux terms.

`train.objective=lm` is the pretraining objective; post-training objectives (`sft`, `dpo`, `grpo`)
register here with `register_objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from megaqwen.kernels.cross_entropy import IGNORE_INDEX
from megaqwen.models.outputs import AuxTerm


class ObjectiveParts(NamedTuple):
    """One micro-batch's (or one sequence shard's) share of the step's objective."""

    sum: torch.Tensor
    """Scalar with grad: the objective summed over this micro-batch's units."""
    count: torch.Tensor
    """Its units (valid tokens for `lm`)."""
    metrics: dict[str, torch.Tensor] = {}
    """Detached sums over the same units, logged under their names as sum / the step's global units
    (names in `megaqwen.train.metric_names`: a built-in objective registers its own, e.g. `dpo/margin`;
    a user's objective uses the documented family `objective/<name>`)."""


@dataclass(frozen=True)
class Objective:
    """A training objective (see the module docstring). `fields`: the batch fields the objective
    reads besides the model inputs (a pipeline hands them to its last stage); `needs_reference`: it
    needs a frozen reference model's per-token log-probabilities in the batch (`reference_logprobs`,
    `megaqwen.train.reference`)."""

    name: str
    parts: Callable[[Any, torch.Tensor, dict[str, torch.Tensor]], ObjectiveParts]
    """parts(model, h (B, T, H) after the final norm, batch) -> ObjectiveParts."""
    units: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    """units(batch) -> the micro-batch's unit count (before the forward: it sets the step's scale)."""
    fields: tuple[str, ...] = ("labels",)
    needs_reference: bool = False
    metrics: tuple[str, ...] = ()
    """Names of the metric sums `parts` returns, as logged (declared: pipeline ranks without the last
    stage reduce them too, as zeros)."""

    def __call__(self, model, h: torch.Tensor, batch: dict[str, torch.Tensor]) -> ObjectiveParts:
        return self.parts(model, h, batch)


SPARSE_LABELS = 0.5
"""`labelled_rows` selects the labelled positions when at most this share of them carry a label."""


def labelled_rows(h_BTH: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor | None]:
    """(h (1, N, H), labels (1, N), index (N,) into the flattened (B*T,) positions) of the N positions
    whose label is not -100, when they are at most SPARSE_LABELS of the batch (post-training: the
    prompt's positions carry no label, and the vocabulary head, most of a small model's step, is then
    computed only where it is read); (h, labels, None) unchanged otherwise or when no label is valid.
    The head is per position, so the values at the kept positions are the full computation's; every
    tp rank holds the same labels (and, under sequence parallelism, the gathered h), so they select
    alike."""
    valid_N = (labels_BT != IGNORE_INDEX).reshape(-1)
    n = int(valid_N.sum())
    if n == 0 or n > SPARSE_LABELS * valid_N.numel():
        return h_BTH, labels_BT, None
    index = valid_N.nonzero().squeeze(1)
    h_NH = h_BTH.reshape(-1, h_BTH.shape[-1]).index_select(0, index)
    return h_NH[None], labels_BT.reshape(-1).index_select(0, index)[None], index


def label_logprobs(model, h_BTH: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) `model.token_logprobs(h, labels)` (0 where the label is -100), with the head computed
    only at the labelled positions when they are sparse (`labelled_rows`)."""
    h_sel, labels_sel, index = labelled_rows(h_BTH, labels_BT)
    logp = model.token_logprobs(h_sel, labels_sel)
    if index is None:
        return logp
    out_N = torch.zeros(labels_BT.numel(), dtype=logp.dtype, device=logp.device)
    return out_N.index_put((index,), logp.reshape(-1)).view(labels_BT.shape)


def _lm_parts(model, h: torch.Tensor, batch: dict[str, torch.Tensor]) -> ObjectiveParts:
    h_sel, labels_sel, _ = labelled_rows(h, batch["labels"])  # SFT: the assistant positions only
    parts = model.loss(h_sel, labels_sel)
    return ObjectiveParts(parts.sum, parts.count)


def _valid_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"] != IGNORE_INDEX).sum()


LM = Objective("lm", _lm_parts, _valid_labels)
"""Next-token cross-entropy over every label that is not -100 (pretraining)."""

REFERENCE_FIELD = "reference_logprobs"
"""The batch field holding the frozen reference model's per-token log-probabilities (B, T), filled by
the trainer for objectives with `needs_reference` (`megaqwen.train.reference`)."""

_OBJECTIVES: dict[str, Objective] = {}


def register_objective(obj: Objective) -> Objective:
    if obj.name in _OBJECTIVES and _OBJECTIVES[obj.name] is not obj:
        raise ValueError(f"objective {obj.name!r} is already registered")
    _OBJECTIVES[obj.name] = obj
    return obj


register_objective(LM)


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


def get_objective(name: str) -> Objective:
    """The objective `train.objective` names: a registered name, or `package.module:NAME` for a
    user's `Objective` (imported, so it exists in every torchrun rank too); a clear error otherwise."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"train.objective={name}: cannot import it ({e})") from e
        if not isinstance(obj, Objective):
            raise ValueError(f"train.objective={name} is a {type(obj).__name__}, not a "
                             "megaqwen.train.objective.Objective")
        return obj
    from megaqwen.suggest import check_choice

    check_choice("train.objective", name, _OBJECTIVES)
    return _OBJECTIVES[name]


def sequence_sums(values_BT: torch.Tensor,
                  batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of per-token values (log-probabilities, rewards): one sum per packed
    document, masked where the label is -100. Returns (sums (S,), row (S,)) for the S documents in
    row order; `batch["document_ids"]` (B, T) numbers the documents within each row (a row without
    packing is one document)."""
    labels = batch["labels"]
    doc = batch.get("document_ids")
    if doc is None:
        doc = torch.zeros_like(labels)
    b, t = labels.shape
    # a global id per (row, document): documents never straddle rows
    width = int(doc.max().item()) + 1 if doc.numel() else 1
    gid = doc + torch.arange(b, device=doc.device)[:, None] * width
    uniq, inverse = torch.unique(gid.reshape(-1), return_inverse=True)
    vals = torch.where(labels != IGNORE_INDEX, values_BT, torch.zeros_like(values_BT)).reshape(-1)
    sums = torch.zeros(uniq.numel(), dtype=values_BT.dtype, device=values_BT.device)
    sums = sums.index_add(0, inverse, vals)
    return sums, uniq // width


def row_sums(values_BT: torch.Tensor, batch: dict[str, Any],
             mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) per-row sums of per-token values over `mask_BT` (default: the valid labels), over the
    whole sequence: under context parallelism each cp rank holds a zig-zag shard of every row, so the
    shards' sums are all-reduced over `batch["cp_group"]` (differentiably: each shard's tokens get the
    gradient of the full row's sum). For objectives on whole rows (DPO's chosen / rejected
    log-probabilities, a reward model's score at one token of each row)."""
    if mask_BT is None:
        mask_BT = batch["labels"] != IGNORE_INDEX
    sums = torch.where(mask_BT, values_BT, torch.zeros_like(values_BT)).sum(dim=1)
    if cp_size(batch) > 1:
        import torch.distributed.nn.functional as dist_fn

        sums = dist_fn.all_reduce(sums, group=batch["cp_group"])
    return sums


def cp_size(batch: dict[str, Any]) -> int:
    """Context-parallel ranks sharing this batch's rows (1 without context parallelism). An objective
    whose every cp rank holds the whole value (row sums, pair losses) reports 1/cp_size of it, as the
    step sums objectives over dp x cp ranks."""
    group = batch.get("cp_group")
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


@dataclass
class StepMeter:
    """One optimizer step's objective and what it logs, for every micro-batch and stage on this rank.

    `add` returns the tensor to back-propagate: `parts.sum * scale + sum_i coef_i * aux_i *
    aux_weight`, where scale = (ranks the wrappers average over) / (global units of the step) and
    aux_weight = 1 / micro-batches (1 under DeepSpeed, which divides by them itself). It records the
    detached values; `reduce` turns them into the step's metrics (collective)."""

    scale: float | torch.Tensor
    aux_weight: float
    metric_names: tuple[str, ...] = ()
    """The objective's declared metrics (`Objective.metrics`): every rank reduces exactly these."""
    loss_sum: torch.Tensor | None = None
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def aux_objective(self, aux: dict[str, AuxTerm]) -> torch.Tensor | None:
        """sum coef * value * aux_weight of the trained terms (None when there are none); records
        every term's value, trained or not (sums stay on the device: no sync per micro-batch)."""
        total = None
        for name, term in aux.items():
            _accumulate(self.aux_sums, name, term.value)
            if term.coef:
                t = term.coef * term.value.float() * self.aux_weight
                total = t if total is None else total + t
        return total

    def add(self, parts: ObjectiveParts, aux: dict[str, AuxTerm] | None = None) -> torch.Tensor:
        v = parts.sum.detach().float()
        self.loss_sum = v if self.loss_sum is None else self.loss_sum + v
        for name, m in parts.metrics.items():
            if name not in self.metric_names:
                raise ValueError(f"the objective returned metric {name!r} it did not declare in "
                                 f"Objective.metrics {self.metric_names}")
            _accumulate(self.metric_sums, name, m)
        objective = parts.sum.float() * self.scale
        extra = self.aux_objective(aux or {})
        return objective if extra is None else objective + extra

    def reduce(self, global_count: torch.Tensor, micro_batches: int, env_mesh,
               pp_group=None) -> dict[str, float]:
        """Collective over the pipeline group (stages' shares add up: the loss lives on the last
        stage, each aux term's share on every stage) and then the dp (x cp for the objective's sums)
        ranks: `loss` and each objective metric are sums / global units; each aux term (a mean per
        micro-batch) is averaged over micro-batches and dp x cp ranks. Same names on every rank."""
        import torch.distributed as dist

        from megaqwen.parallel import setup as par

        names = sorted(self.metric_names)
        aux_names = sorted(self.aux_sums)
        device = global_count.device
        zero = torch.zeros((), device=device)
        loss = self.loss_sum if self.loss_sum is not None else zero
        sums = torch.stack([loss.to(device), *(self.metric_sums.get(n, zero).to(device) for n in names)])
        aux = torch.stack([self.aux_sums[n].to(device) for n in aux_names]) if aux_names else None
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.all_reduce(sums, group=pp_group)
            if aux is not None:
                dist.all_reduce(aux, group=pp_group)
        sums = par.dp_sum(sums, env_mesh, with_cp=True) / global_count
        out = {"loss": sums[0].item(), **{n: sums[i + 1].item() for i, n in enumerate(names)}}
        if aux is not None:  # each cp rank's term is its shard's: averaged over dp x cp as the grads
            ranks = env_mesh.dims.dp * env_mesh.dims.cp if env_mesh is not None else 1
            aux = par.dp_sum(aux, env_mesh, with_cp=True) / (micro_batches * ranks)
            out.update({n: aux[i].item() for i, n in enumerate(aux_names)})
        return out


def _accumulate(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    v = value.detach().float()
    sums[name] = v if name not in sums else sums[name] + v.to(sums[name].device)
