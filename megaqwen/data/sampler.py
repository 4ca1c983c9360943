"""Resumable, data-parallel-aware micro-batch iterator (Megatron `MegatronPretrainingSampler` order).

The dataset's sample order is already fixed by its seed, so the whole schedule is a function of one
integer, `consumed_samples` (summed over all data-parallel ranks). Global batch g is samples
[g * GBS, (g + 1) * GBS); it is cut into GBS / (MBS * dp_size) micro-steps, and in micro-step m rank r
reads samples [base + r * MBS, base + (r + 1) * MBS) with base = g * GBS + m * MBS * dp_size. Ranks
never overlap, together they cover the global batch, and a run restarted from a checkpoint's
`consumed_samples` yields exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class BatchIterator:
    """Yields this rank's micro-batches: dicts of (micro_batch_size, seq_len) int64 tensors."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
    ):
        if min(global_batch_size, micro_batch_size, dp_size) < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need global_batch_size, micro_batch_size, dp_size >= 1 and 0 <= dp_rank < dp_size; "
                f"got {global_batch_size}, {micro_batch_size}, {dp_size}, dp_rank={dp_rank}"
            )
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by micro_batch_size "
                f"{micro_batch_size} x dp_size {dp_size} = {micro_batch_size * dp_size}"
            )
        if getattr(dataset, "pair_rows", False) and micro_batch_size % 2:
            raise ValueError(f"train.micro_batch_size={micro_batch_size} is odd, but a dpo shard's rows come "
                             "in (chosen, rejected) pairs that must share a micro-batch; use an even size")
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._consumed = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all ranks together; save it in checkpoints."""
        return self._consumed

    @property
    def micro_batches_per_step(self) -> int:
        """Gradient-accumulation steps per optimizer step on each rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def state_dict(self) -> dict[str, int]:
        return {
            "consumed_samples": self._consumed,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state["consumed_samples"]` (other keys are informational: batch sizes and the
        data-parallel degree may change between runs as long as the position is a micro-step boundary)."""
        consumed = int(state["consumed_samples"])
        step = self.micro_batch_size * self.dp_size
        if consumed < 0 or consumed % step:
            raise ValueError(
                f"consumed_samples {consumed} is not a multiple of micro_batch_size x dp_size = {step}"
            )
        if consumed > len(self.dataset):
            raise ValueError(
                f"consumed_samples {consumed} is past the end of the dataset ({len(self.dataset)} samples)"
            )
        self._consumed = consumed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        step = self.micro_batch_size * self.dp_size
        if self._consumed + step > len(self.dataset):
            raise StopIteration
        first = self._consumed + self.dp_rank * self.micro_batch_size
        items = [self.dataset[i] for i in range(first, first + self.micro_batch_size)]
        self._consumed += step
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}  # each (B_micro, T)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The `micro_batches_per_step` micro-batches of the next optimizer step."""
        if self._consumed % self.global_batch_size:
            raise RuntimeError(
                f"consumed_samples {self._consumed} is inside a global batch of "
                f"{self.global_batch_size}; next_step() must start at a step boundary"
            )
        if self._consumed + self.global_batch_size > len(self.dataset):
            raise StopIteration
        return [next(self) for _ in range(self.micro_batches_per_step)]
