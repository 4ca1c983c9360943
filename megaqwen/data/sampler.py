"""Resumable, data-parallel-aware micro-batch iterator (Megatron `MegatronPretrainingSampler` order).

The dataset's sample order is already fixed by its seed, so the whole schedule is a function of one
integer, `consumed_samples` (summed over all data-parallel ranks). Global batch g is samples
[g * GBS, (g + 1) * GBS); it is cut into GBS / (MBS * dp_size) micro-steps, and in micro-step m rank r
reads samples [base + r * MBS, base + (r + 1) * MBS) with base = g * GBS + m * MBS * dp_size. Ranks
never overlap, together they cover the global batch, and a run restarted from a checkpoint's
`consumed_samples` yields exactly the batches the uninterrupted run would have.

With `num_workers` > 0 the micro-batches are read and stacked by that many worker processes (a torch
`DataLoader` over this rank's micro-batch schedule), `prefetch` micro-batches ahead per worker, pinned
for a fast copy to the GPU with `pin_memory`; the order is the same and the state is still the one
integer: `consumed_samples` counts the micro-batches handed out, not the ones read ahead.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

import torch

# fork: the workers share the parent's memory-mapped shards and indexes; a spawned worker would get a
# pickled copy of every array (numpy pickles a memmap as its data)
_CONTEXT = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


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
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
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
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers}, {prefetch}")
        if getattr(dataset, "pair_rows", False):
            from megaqwen.data.pairs import check_pair_rows

            check_pair_rows(micro_batch_size, f"{dataset.indexed.prefix} (a dpo shard)")
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        self._consumed = 0
        self._loader = None  # the workers' iterator, started at the first micro-batch after a (re)position
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
        self.close()
        self._consumed = consumed

    def close(self) -> None:
        """Stop the worker processes (they restart at the next micro-batch)."""
        if self._loader is not None:
            self._loader._shutdown_workers()
            self._loader = None

    def _micro_batch(self, first: int) -> dict[str, torch.Tensor]:
        items = [self.dataset[i] for i in range(first, first + self.micro_batch_size)]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}  # each (B_micro, T)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        step = self.micro_batch_size * self.dp_size
        if self._consumed + step > len(self.dataset):
            self.close()  # the workers have nothing left to read
            raise StopIteration
        if self.num_workers == 0:
            batch = self._micro_batch(self._consumed + self.dp_rank * self.micro_batch_size)
        else:
            if self._loader is None:
                schedule = _Schedule(self, self._consumed)
                self._loader = iter(torch.utils.data.DataLoader(
                    schedule, batch_size=None, shuffle=False, num_workers=self.num_workers,
                    prefetch_factor=self.prefetch, pin_memory=self.pin_memory,
                    multiprocessing_context=_CONTEXT))
            batch = next(self._loader)
        self._consumed += step
        return batch

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


class _Schedule(torch.utils.data.Dataset):
    """Item m = this rank's m-th micro-batch from sample position `start` on (for the workers)."""

    def __init__(self, it: BatchIterator, start: int):
        self.it, self.start = it, start
        self.step = it.micro_batch_size * it.dp_size
        self.length = (len(it.dataset) - start) // self.step

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, m: int) -> dict[str, torch.Tensor]:
        return self.it._micro_batch(self.start + m * self.step + self.it.dp_rank * self.it.micro_batch_size)
