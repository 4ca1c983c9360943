"""Regenerate the toy verifiable task of the GRPO demo and tests: single-digit addition.

    python -m megaqwen.data_pipeline.samples.make_arithmetic [--out-dir DIR] [--seed 0]

A question "3+4=" (user turn, after the short system prompt "Add.") is answered by the sum alone,
"7". 100 distinct questions (a, b in 0..9): a debug-sized model learns part of the table from a
short SFT and a verifier checks any answer exactly, so online RL (GRPO) can raise the share of right
answers. Three files, byte-for-byte reproducible from the seed:

- `arithmetic_sft.jsonl`: `{"messages": [system, user, assistant]}` conversations
  (`megaqwen-data tokenize --format sft`);
- `arithmetic_pairs.jsonl`: `{"prompt": [system, user], "chosen": right, "rejected": wrong}` with a
  wrong sum off by 1 or 2 (`--format dpo`);
- `arithmetic_prompts.jsonl`: `{"messages": [system, user], "answer": "7"}`, the GRPO prompt stream
  (`rollout.prompts`); the answer is what the maths verifier compares with.

The three draw from the same 100 questions: this is a learnability demo, not a held-out benchmark.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = "Add."


def question(rng: random.Random) -> tuple[list[dict], int]:
    """(prompt messages, the right sum)."""
    a, b = rng.randrange(10), rng.randrange(10)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{a}+{b}="}], a + b


def conversation(rng: random.Random) -> dict:
    prompt, answer = question(rng)
    return {"messages": prompt + [{"role": "assistant", "content": str(answer)}]}


def pair(rng: random.Random) -> dict:
    prompt, answer = question(rng)
    wrong = answer + rng.choice([x for x in (-2, -1, 1, 2) if answer + x >= 0])
    return {"prompt": prompt, "chosen": str(answer), "rejected": str(wrong)}


def rl_prompt(rng: random.Random) -> dict:
    prompt, answer = question(rng)
    return {"messages": prompt, "answer": str(answer)}


def closeness(samples) -> list[float | None]:
    """A dense reward for the toy task (`grpo.rewards` name
    `megaqwen.data_pipeline.samples.make_arithmetic:closeness`): 1 - |answer - sum| / 5, floored at 0,
    for the completion's final number (0 without one; None for a record without `answer`). Beside the
    exact maths verifier it rewards near misses, so a debug model that knows part of the table gets a
    signal from most groups, not only from those where one completion is exactly right."""
    from megaqwen.rewards.math_answer import extract_answer

    out: list[float | None] = []
    for s in samples:
        if "answer" not in s.record:
            out.append(None)
            continue
        got = extract_answer(s.completion)
        try:
            out.append(max(0.0, 1.0 - abs(float(got) - float(s.record["answer"])) / 5.0))
        except (TypeError, ValueError):
            out.append(0.0)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(HERE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--pairs", type=int, default=500)
    p.add_argument("--prompts", type=int, default=1000)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out_dir)
    for name, make, n in (("arithmetic_sft.jsonl", conversation, args.conversations),
                          ("arithmetic_pairs.jsonl", pair, args.pairs),
                          ("arithmetic_prompts.jsonl", rl_prompt, args.prompts)):
        (out / name).write_text("".join(json.dumps(make(rng), ensure_ascii=False) + "\n" for _ in range(n)))


if __name__ == "__main__":
    main()
