"""The code reward: the completion's last fenced code block runs with the record's `tests` (Python
asserts) in the sandbox (`megaqwen.rewards.sandbox`); 1.0 when every assert passes, else 0.0. A record
without `tests` is not a code task: the component does not apply to it (None)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from megaqwen.rewards.sample import Sample
from megaqwen.rewards.sandbox import SandboxConfig, run_python

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The last fenced code block of a response (```python or plain ```), else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def tests_source(tests) -> str:
    """A record's `tests`: a string, or a list of strings joined by lines."""
    if isinstance(tests, list):
        return "\n".join(str(t) for t in tests)
    if not isinstance(tests, str):
        raise ValueError(f"a record's 'tests' must be a string or a list of strings, got "
                         f"{type(tests).__name__}")
    return tests


def code_reward(samples: list[Sample], timeout_s: float = 5.0, workers: int = 4) -> list[float | None]:
    """1.0 / 0.0 per sample with `tests` (checked `workers` at a time), None for the others."""
    config = SandboxConfig(timeout_s=timeout_s)
    jobs = []
    for i, s in enumerate(samples):
        if "tests" in s.record:
            try:
                jobs.append((i, extract_code(s.completion), tests_source(s.record["tests"])))
            except ValueError as e:
                raise ValueError(f"sample {i}: {e}") from e
    out: list[float | None] = [None] * len(samples)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda job: run_python(job[1], job[2], config), jobs)
        for (i, _, _), result in zip(jobs, results, strict=True):
            out[i] = float(result.passed)
    return out
