"""Offline-RL preference pairs from verifiers: sample responses, check them, keep (pass, fail) pairs.

A task is one line of the prompts file (read by `megaqwen.data.prompts`, which also renders it for the
samplers): `{"prompt": str}` or `{"messages": [...]}`, plus either
`"answer"` (maths: the final answer, checked by `math_answer.equivalent`) or `"tests"` (code: Python
asserts, a string or a list of strings, run after the response's last fenced code block in the
sandbox). A pair `{"prompt"|"messages", "chosen", "rejected", "source"}` is written only for a task
where at least one sampled response passes and one fails; that is the record
`megaqwen-data tokenize --format dpo` reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megaqwen.data.prompts import prompt_messages, read_prompt_records
from megaqwen.rewards.code import extract_code
from megaqwen.rewards.math_answer import equivalent, extract_answer
from megaqwen.rewards.sandbox import SandboxConfig, isolation, run_python

log = logging.getLogger("megaqwen.verify_pairs")


@dataclass(frozen=True)
class Task:
    line: int
    """1-based line of the prompts file."""
    record: dict
    """The prompt record as read (`megaqwen.data.prompts`): `prompt` or `messages`, and the check."""
    answer: str | None
    """Maths: the reference final answer."""
    tests: str | None
    """Code: Python source asserting on the response's program."""

    @property
    def kind(self) -> str:
        return "math" if self.answer is not None else "code"

    @property
    def chat(self) -> list[dict]:
        return prompt_messages(self.record)

    def prompt_fields(self) -> dict:
        return {k: self.record[k] for k in ("prompt", "messages") if k in self.record}


Generator = Callable[[list[Task], int], list[list[str]]]
"""tasks, n -> n sampled responses (assistant text) per task. `hf_generate.hf_generator` is one;
tests pass canned responses."""


def read_tasks(path: str | Path) -> list[Task]:
    """Every task of a jsonl prompts file (`megaqwen.data.prompts.read_prompt_records`, plus exactly one
    of `answer` and `tests`); a malformed line raises ValueError naming it."""
    tasks = []
    for p in read_prompt_records(path):
        rec = p.record
        if ("answer" in rec) == ("tests" in rec):
            raise ValueError(f"{p.where}: needs exactly one of 'answer' (maths) and 'tests' (code)")
        tests = rec.get("tests")
        if isinstance(tests, list):
            tests = "\n".join(tests)
        answer = rec.get("answer")
        tasks.append(Task(p.line, rec, None if answer is None else str(answer), tests))
    return tasks


def verify(task: Task, response: str, sandbox: SandboxConfig) -> str:
    """"passed" or the failure reason: no_answer / wrong_answer (maths), or a sandbox REASON (code)."""
    if task.kind == "math":
        got = extract_answer(response)
        if got is None:
            return "no_answer"
        return "passed" if equivalent(got, task.answer) else "wrong_answer"
    return run_python(extract_code(response), task.tests, sandbox).reason


@dataclass
class Summary:
    prompts: int = 0
    samples: int = 0
    passed: int = 0
    pairs: int = 0
    """Pairs written."""
    prompts_with_pairs: int = 0
    prompts_all_passed: int = 0
    prompts_all_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Failed samples by reason."""
    isolation: str = ""
    """The sandbox's isolation on this machine (code tasks only), e.g. netns+pidns+audit-hook."""
    seconds: float = 0.0


def build_pairs(tasks: list[Task], generate: Generator, samples: int, output: str | Path,
                sandbox: SandboxConfig | None = None, pairs_per_prompt: int = 1, batch_prompts: int = 8,
                workers: int = 2, log_every_s: float = 30.0, source: str = "") -> Summary:
    """Sample `samples` responses per task, verify each (`workers` checks at a time), and write up to
    `pairs_per_prompt` (passing, failing) pairs per task to `output` (jsonl). Returns the counts."""
    if samples < 2 or pairs_per_prompt < 1 or batch_prompts < 1 or workers < 1:
        raise ValueError(f"samples={samples} must be >= 2 (a pair needs two responses); pairs_per_prompt="
                         f"{pairs_per_prompt}, batch_prompts={batch_prompts}, workers={workers} must be >= 1")
    sandbox = sandbox or SandboxConfig()
    summary, failures = Summary(), Counter()
    if any(t.kind == "code" for t in tasks):
        summary.isolation = isolation()
    start = last_log = time.monotonic()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as out, ThreadPoolExecutor(workers) as pool:
        for b in range(0, len(tasks), batch_prompts):
            batch = tasks[b:b + batch_prompts]
            responses = generate(batch, samples)
            if len(responses) != len(batch) or any(len(r) != samples for r in responses):
                raise ValueError(f"the generator returned {[len(r) for r in responses]} responses for "
                                 f"{len(batch)} prompts x {samples} samples")
            jobs = [(t, r) for t, rs in zip(batch, responses) for r in rs]
            reasons = list(pool.map(lambda job: verify(job[0], job[1], sandbox), jobs))
            for k, task in enumerate(batch):
                verdicts = list(zip(responses[k], reasons[k * samples:(k + 1) * samples]))
                for rec in _pairs(task, verdicts, pairs_per_prompt, source):
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    summary.pairs += 1
                n_pass = sum(r == "passed" for _, r in verdicts)
                summary.prompts_with_pairs += 0 < n_pass < samples
                summary.prompts_all_passed += n_pass == samples
                summary.prompts_all_failed += n_pass == 0
                summary.passed += n_pass
                failures.update(r for _, r in verdicts if r != "passed")
            summary.prompts += len(batch)
            summary.samples += len(jobs)
            out.flush()
            now = time.monotonic()
            if now - last_log >= log_every_s or summary.prompts == len(tasks):
                last_log = now
                rate = summary.prompts / max(now - start, 1e-9)
                log.info("%d/%d prompts, %d samples, %d passed, %d pairs; %.2f prompts/s, ETA %.0f s",
                         summary.prompts, len(tasks), summary.samples, summary.passed, summary.pairs, rate,
                         (len(tasks) - summary.prompts) / max(rate, 1e-9))
    summary.failures = dict(sorted(failures.items()))
    summary.seconds = round(time.monotonic() - start, 3)
    return summary


def _pairs(task: Task, verdicts: list[tuple[str, str]], limit: int, source: str) -> list[dict]:
    """(passing, failing) pairs of distinct texts, each response used at most once."""
    passing = list(dict.fromkeys(r for r, v in verdicts if v == "passed"))
    failing = list(dict.fromkeys((r, v) for r, v in verdicts if v != "passed" and r not in passing))
    return [{**task.prompt_fields(), "chosen": good, "rejected": bad,
             "source": {"verifier": task.kind, "line": task.line, "rejected_reason": why,
                        "checkpoint": source}}
            for good, (bad, why) in list(zip(passing, failing))[:limit]]


def summary_dict(summary: Summary) -> dict:
    return asdict(summary)
