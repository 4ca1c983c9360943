"""What a reward function scores: one completion of one prompt record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One rollout to score."""

    record: dict[str, Any]
    """The prompt record as read from the prompts file: `prompt` (str) or `messages` (chat turns),
    plus what the verifiers check against: `answer` (maths, the reference final answer) or `tests`
    (code, Python asserts: a string or a list of strings)."""
    completion: str
    """The generated response text (the assistant turn, without the prompt)."""
    token_ids: list[int] = field(default_factory=list)
    """The completion's token ids as generated (for length-aware rewards)."""

    def messages(self) -> list[dict]:
        """The prompt as chat turns (a bare `prompt` is one user turn: `megaqwen.data.prompts`)."""
        from megaqwen.data.prompts import prompt_messages

        return prompt_messages(self.record)
