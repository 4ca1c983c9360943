"""The unit every pipeline step works on, and the counters each step keeps."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One text record; `metadata` collects what steps learn (language, scores, domain, tokens)."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)
    """where the document was read (`file:line`), for error messages; not written out."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, **({"metadata": self.metadata} if self.metadata else {})}

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> Document:
        return cls(id=str(rec["id"]), text=rec["text"], metadata=dict(rec.get("metadata") or {}))


@dataclass
class StepStats:
    """Kept / removed / modified counts of one step, with the reason for every removal."""

    name: str
    seen: int = 0
    kept: int = 0
    removed: int = 0
    modified: int = 0  # kept documents whose text the step changed (normalise, PII masking, line filters)
    reasons: Counter = field(default_factory=Counter)  # removal reason -> documents
    changes: Counter = field(default_factory=Counter)  # what the step did to kept documents -> count

    def remove(self, reason: str) -> None:
        self.removed += 1
        self.reasons[reason] += 1

    def merge(self, other: StepStats) -> None:
        self.seen += other.seen
        self.kept += other.kept
        self.removed += other.removed
        self.modified += other.modified
        self.reasons.update(other.reasons)
        self.changes.update(other.changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seen": self.seen,
            "kept": self.kept,
            "removed": self.removed,
            "modified": self.modified,
            "reasons": dict(sorted(self.reasons.items())),
            "changes": dict(sorted(self.changes.items())),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepStats:
        return cls(
            d["name"],
            d["seen"],
            d["kept"],
            d["removed"],
            d.get("modified", 0),
            Counter(d["reasons"]),
            Counter(d.get("changes", {})),
        )


def merge_stats(per_task: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Sum the per-task step stats (lists in step order) into one list."""
    merged: dict[str, StepStats] = {}
    for stats in per_task:
        for d in stats:
            s = StepStats.from_json(d)
            if s.name in merged:
                merged[s.name].merge(s)
            else:
                merged[s.name] = s
    return [s.to_json() for s in merged.values()]
