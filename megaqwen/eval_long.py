"""Long-context evaluation: passkey retrieval over lengths x depths, and perplexity vs context length.

    megaqwen-eval passkey --checkpoint CKPT --lengths 1024 4096 16384 --depths 0 0.25 0.5 0.75 1 --out DIR
    megaqwen-eval ppl-length --checkpoint CKPT --data FILE --lengths 512 2048 8192 --out DIR

Passkey (Mohtashami & Jaggi 2023): filler sentences with "The pass key is NNNNN. Remember it. NNNNN is
the pass key." inserted at a relative depth (0 = start, 1 = end of the filler), then "What is the pass
key? The pass key is"; a trial passes when every token of " NNNNN" is the model's top choice given
the tokens before it (what greedy decoding would write). Each cell is the mean over --trials keys;
the mean log-probability of the key is reported too (informative before a model retrieves anything).
Writes passkey.json, a markdown table and passkey.png (heat map, depth x length).

Perplexity vs length: the documents are joined into one token stream and cut into windows of each
length (at most --max-windows); ppl(L) is exp of the mean loss over every predicted token of those
windows. Writes ppl_length.json and ppl_length.png. Both take --yarn / --dca like `megaqwen-eval loss`.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
    """(prompt ids of exactly `length` tokens minus the answer, answer ids " KEY")."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth {depth} must be in [0, 1]")
    unit = tokenizer.encode(FILLER, add_special_tokens=False)
    needle = tokenizer.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ",
                              add_special_tokens=False)
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    answer = tokenizer.encode(f" {key}", add_special_tokens=False)
    n_filler = length - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f"passkey length {length} is below the {length - n_filler} tokens of the "
                         "needle, question and answer")
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    at = round(depth * (n_filler // len(unit))) * len(unit)  # a whole number of filler sentences
    at = min(at, n_filler)
    return filler[:at] + needle + filler[at:] + question, answer


@torch.no_grad()
def score_answer(model, prompt: list[int], answer: list[int], device) -> tuple[bool, float]:
    """(every answer token is the argmax given the tokens before it, mean log-prob of the answer)."""
    ids = torch.tensor(prompt + answer, device=device)[None]
    logits = model(ids[:, :-1])[0, len(prompt) - 1:].float()  # (len(answer), V)
    target = ids[0, len(prompt):]
    logp = logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    return bool((logits.argmax(-1) == target).all()), float(logp.mean())


def passkey_grid(model, tokenizer, lengths: list[int], depths: list[float], trials: int, device,
                 seed: int = 0) -> dict:
    rng = random.Random(seed)
    cells = []
    for length in lengths:
        for depth in depths:
            hits, logps = [], []
            for _ in range(trials):
                prompt, answer = passkey_prompt(tokenizer, length, depth, rng.randint(10_000, 99_999))
                ok, logp = score_answer(model, prompt, answer, device)
                hits.append(ok)
                logps.append(logp)
            cells.append({"length": length, "depth": depth, "accuracy": sum(hits) / trials,
                          "mean_logprob": sum(logps) / trials})
    return {"lengths": lengths, "depths": depths, "trials": trials, "cells": cells}


def passkey_table(result: dict) -> str:
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    head = "| depth \\ length | " + " | ".join(str(n) for n in result["lengths"]) + " |"
    rows = [head, "|---|" + "---:|" * len(result["lengths"])]
    for d in result["depths"]:
        rows.append(f"| {d:g} | " + " | ".join(f"{acc[(n, d)]:.2f}" for n in result["lengths"]) + " |")
    return "\n".join(rows)


def plot_passkey(result: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = result["lengths"], result["depths"]
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    grid = [[acc[(n, d)] for n in lengths] for d in depths]  # rows: depth, columns: length
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"passkey retrieval ({result['trials']} keys per cell)")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def perplexity_by_length(model, docs: list[list[int]], lengths: list[int], max_windows: int,
                         device) -> list[dict]:
    stream = [t for d in docs for t in d]
    out = []
    for n in lengths:
        windows = min(max_windows, (len(stream) - 1) // n)
        if windows == 0:
            raise ValueError(f"the data has {len(stream)} tokens: too few for one window of {n} + 1")
        total, count = 0.0, 0
        for w in range(windows):
            x = torch.tensor(stream[w * n:w * n + n + 1], device=device)[None]
            parts = model(x[:, :-1], labels=x[:, 1:])
            total += parts.sum.item()
            count += int(parts.count)
        loss = total / count
        out.append({"length": n, "windows": windows, "tokens": count, "loss": loss,
                    "perplexity": math.exp(min(loss, 50))})
    return out


def plot_perplexity(rows: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["length"] for r in rows], [r["perplexity"] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "perplexity vs context length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_passkey(model, out_dir: Path, lengths: list[int], depths: list[float], trials: int, device,
                title: str = "") -> dict:
    from megaqwen.tokenizer import load_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    result = passkey_grid(model, load_tokenizer(), lengths, depths, trials, device)
    (out_dir / "passkey.json").write_text(json.dumps(result, indent=1))
    (out_dir / "passkey.md").write_text(passkey_table(result) + "\n")
    result["png"] = str(plot_passkey(result, out_dir / "passkey.png", title))
    return result
