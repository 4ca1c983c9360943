"""`megaqwen-data tiny-judge`: save a tiny random-weight Qwen2 causal LM + the Qwen2.5 tokenizer.

It exercises the judge path end to end on a laptop (and in tests) without downloading weights.
Its scores are meaningless: point `judge.model` at real Qwen2-Instruct weights for real labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_tiny_qwen2(seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


def save_tiny_judge(out: Path, seed: int = 0) -> Path:
    from megaqwen.tokenizer import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    build_tiny_qwen2(seed).save_pretrained(out)
    load_tokenizer().save_pretrained(out)
    return out


def run(args: argparse.Namespace) -> int:
    save_tiny_judge(Path(args.out), args.seed)
    print(json.dumps({"saved": args.out, "note": "random weights: scores are meaningless"}))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tiny-judge",
        help="save a tiny random judge model, to try the judge-enabled pipeline offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
