"""Rule-based rewards: maths answer equivalence and format checks, 1.0 or 0.0 per sample.

`math`: the completion's final answer (`math_answer.extract_answer`: the last \\boxed{}, "answer is X",
else the last number) is equivalent (`math_answer.equivalent`) to the record's `answer`. A record
without `answer` is not a maths task: the component does not apply to it (None).
`format`: the completion matches a pattern (`spec.FORMAT_PRESETS` or a regular expression).
"""

from __future__ import annotations

import re

from megaqwen.rewards.math_answer import equivalent, extract_answer
from megaqwen.rewards.sample import Sample
from megaqwen.rewards.spec import FORMAT_PRESETS


def math_reward(samples: list[Sample]) -> list[float | None]:
    """1.0 where the final answer equals the record's `answer`, 0.0 where not, None without `answer`."""
    out: list[float | None] = []
    for s in samples:
        if "answer" not in s.record:
            out.append(None)
            continue
        out.append(float(equivalent(extract_answer(s.completion), s.record["answer"])))
    return out


def format_reward(samples: list[Sample], pattern: str = "boxed") -> list[float | None]:
    """1.0 where the completion matches `pattern` (a preset name or a regex, DOTALL search)."""
    rx = re.compile(FORMAT_PRESETS.get(pattern, pattern), re.DOTALL)
    return [float(rx.search(s.completion) is not None) for s in samples]
