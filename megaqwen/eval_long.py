"""Long-context evaluation: passkey retrieval over lengths x depths, and perplexity vs context length.

    megaqwen-eval passkey --checkpoint CKPT --lengths 1024 4096 16384 --depths 0 0.25 0.5 0.75 1 --out DIR
    megaqwen-eval ppl-length --checkpoint CKPT --data FILE --lengths 512 2048 8192 --out DIR

Passkey (Mohtashami & Jaggi 2023): filler sentences with "The pass key is NNNNN. Remember it. NNNNN is
the pass key." inserted at a relative depth (0 = start, 1 = end of the filler), then "What is the pass
key? The pass key is"; a trial passes when every token of " NNNNN" is the model's top choice given
the tokens before it (what greedy decoding would write). Each cell is the mean over --trials keys;
the mean log-probability of the key is reported too (informative before a model retrieves anything).
Keys are uniform over KEYS (90,000 of them), so a model that knows the format but not the key scores
1/90,000 (the chance level, marked on the heat map's colour bar) and a mean log-probability of
ln(1/90,000) / len(answer tokens). Lengths beyond the positions the model was trained at (its
max_position_embeddings, or YaRN's original length) are warned about and marked on the heat map:
retrieval there measures length extrapolation. Writes passkey.json, a markdown table and passkey.png
(heat map, depth x length).

Perplexity vs length: the documents are joined into one token stream and cut into windows of each
length (at most --max-windows); ppl(L) is exp of the mean loss over every predicted token of those
windows. Writes ppl_length.json and ppl_length.png. Both take --yarn / --dca like `megaqwen-eval loss`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch

log = logging.getLogger("megaqwen.eval")
KEYS = range(10_000, 100_000)  # the pass keys drawn: every 5-digit number
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
                prompt, answer = passkey_prompt(tokenizer, length, depth, rng.randint(KEYS[0], KEYS[-1]))
                ok, logp = score_answer(model, prompt, answer, device)
                hits.append(ok)
                logps.append(logp)
            cells.append({"length": length, "depth": depth, "accuracy": sum(hits) / trials,
                          "mean_logprob": sum(logps) / trials})
    n_answer = len(tokenizer.encode(f" {KEYS[0]}", add_special_tokens=False))  # the same for every key
    return {"lengths": lengths, "depths": depths, "trials": trials, "cells": cells,
            "chance": chance_level(n_answer)}


def chance_level(answer_tokens: int) -> dict[str, float]:
    """What guessing a uniform key scores: accuracy 1/len(KEYS), and the mean log-probability per
    answer token of a model that puts 1/len(KEYS) on the whole answer."""
    return {"accuracy": 1 / len(KEYS), "mean_logprob": -math.log(len(KEYS)) / answer_tokens}


def trained_positions(cfg) -> tuple[int, str]:
    """(positions the model was trained at, where that number comes from) of a ModelConfig."""
    if getattr(cfg, "rope_scaling", "none") == "yarn" and cfg.rope_original_max_position > 0:
        return cfg.rope_original_max_position, (
            f"YaRN's original length; x{cfg.rope_scaling_factor:g} stretches RoPE to "
            f"{int(cfg.rope_original_max_position * cfg.rope_scaling_factor)}")
    return cfg.max_position_embeddings, "model.max_position_embeddings"


def warn_beyond_trained(lengths: list[int], cfg) -> list[int]:
    """Log one warning naming the lengths beyond the model's trained positions; returns them."""
    trained, source = trained_positions(cfg)
    beyond = [n for n in lengths if n > trained]
    if beyond:
        dca = " (Dual Chunk Attention on)" if getattr(cfg, "dca_chunk_size", 0) else ""
        log.warning("passkey lengths %s exceed the %d positions the model was trained at (%s)%s: retrieval "
                    "there measures length extrapolation; --yarn FACTOR or --dca CHUNK LOCAL extend it",
                    beyond, trained, source, dca)
    return beyond


def passkey_table(result: dict) -> str:
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    head = "| depth \\ length | " + " | ".join(str(n) for n in result["lengths"]) + " |"
    rows = [head, "|---|" + "---:|" * len(result["lengths"])]
    for d in result["depths"]:
        rows.append(f"| {d:g} | " + " | ".join(f"{acc[(n, d)]:.2f}" for n in result["lengths"]) + " |")
    if "chance" in result:
        c = result["chance"]
        rows += ["", f"chance: accuracy {c['accuracy']:.1e} (1 in {len(KEYS):,} keys), mean log-prob "
                 f"{c['mean_logprob']:.2f} per answer token"]
    if result.get("trained_positions"):
        rows.append(f"trained positions: {result['trained_positions']} (longer columns extrapolate)")
    return "\n".join(rows)


def plot_passkey(result: dict, path: Path, title: str = "") -> Path:
    import matplotlib.pyplot as plt

    fig = passkey_figure(result, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def passkey_figure(result: dict, title: str = ""):
    """The heat map (depth x length) as a matplotlib Figure: the chance level as a line on the colour
    bar, and a dashed line before the first length beyond the trained positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = result["lengths"], result["depths"]
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    grid = [[acc[(n, d)] for n in lengths] for d in depths]  # rows: depth, columns: length
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.5 * len(depths) + 2.3))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    head = title or f"passkey retrieval ({result['trials']} keys per cell)"
    bar = fig.colorbar(im, ax=ax, label="accuracy")
    chance = result.get("chance", {}).get("accuracy")
    if chance is not None:
        bar.ax.axhline(chance, color="black", lw=2)
        bar.ax.text(0.5, chance + 0.01, "chance", transform=bar.ax.get_yaxis_transform(), ha="center",
                    va="bottom", rotation=90, color="white", fontsize=7)
        head += f"\nchance: 1 in {round(1 / chance):,} keys"
    trained = result.get("trained_positions")
    first_beyond = next((j for j, n in enumerate(lengths) if trained and n > trained), None)
    if first_beyond is not None:
        ax.axvline(first_beyond - 0.5, color="black", ls="--", lw=1.5)
        ax.text(first_beyond - 0.45, -0.45, f"beyond the {trained}\ntrained positions", va="top",
                fontsize=7)
    ax.set_title(head, fontsize=10)
    fig.tight_layout()
    return fig


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
    cfg = getattr(model, "cfg", None)
    beyond = warn_beyond_trained(lengths, cfg) if cfg is not None else []
    result = passkey_grid(model, load_tokenizer(), lengths, depths, trials, device)
    if cfg is not None:
        result.update(trained_positions=trained_positions(cfg)[0], beyond_trained=beyond)
    (out_dir / "passkey.json").write_text(json.dumps(result, indent=1))
    (out_dir / "passkey.md").write_text(passkey_table(result) + "\n")
    result["png"] = str(plot_passkey(result, out_dir / "passkey.png", title))
    return result
