"""Regenerate `chat.jsonl` (SFT) and `preferences.jsonl` (DPO), the toy chat sets of the README demo
and the tests.

    python -m megaqwen.data_pipeline.samples.make_chat [--out-dir DIR] [--seed 0]

Short synthetic conversations the debug model can learn from a few hundred steps: additions, echoing
a word, capitals of countries, counting letters; about a third are two-turn, some with a system
prompt. Preference pairs prefer the right answer over a wrong one. Byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago",
    "India": "New Delhi", "China": "Beijing", "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana",
    "Germany": "Berlin",
}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver",
         "forest", "candle", "window", "planet", "yellow", "bridge"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a careful tutor."]


def qa(rng: random.Random) -> tuple[str, str, str]:
    """(question, right answer, wrong answer)."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        off = rng.choice([-2, -1, 1, 2])
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + off}."
    if kind == 1:
        w = rng.choice(WORDS)
        return f"Repeat the word: {w}", f"{w}", f"{rng.choice([x for x in WORDS if x != w])}"
    if kind == 2:
        country = rng.choice(sorted(CAPITALS))
        wrong = rng.choice([c for c in CAPITALS.values() if c != CAPITALS[country]])
        return (f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}.",
                f"The capital of {country} is {wrong}.")
    w = rng.choice(WORDS)
    return f"How many letters are in {w}?", f"{w} has {len(w)} letters.", f"{w} has {len(w) + 1} letters."


def conversation(rng: random.Random) -> dict:
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.35 else 1):
        q, right, _ = qa(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": right}]
    return {"messages": msgs}


def preference(rng: random.Random) -> dict:
    q, right, wrong = qa(rng)
    return {"prompt": q, "chosen": right, "rejected": wrong}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(HERE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", type=int, default=600)
    p.add_argument("--pairs", type=int, default=300)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out_dir)
    chats = [json.dumps(conversation(rng), ensure_ascii=False) for _ in range(args.conversations)]
    prefs = [json.dumps(preference(rng), ensure_ascii=False) for _ in range(args.pairs)]
    (out / "chat.jsonl").write_text("\n".join(chats) + "\n")
    (out / "preferences.jsonl").write_text("\n".join(prefs) + "\n")


if __name__ == "__main__":
    main()
