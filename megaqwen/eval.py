"""`megaqwen-eval loss --checkpoint PATH --data FILE`: mean next-token loss of a checkpoint.

PATH is a native checkpoint (step folder, checkpoints/ or run folder) or an HF folder. FILE is
jsonl with one document per row: `{"text": ...}` (Qwen tokenizer, no BOS, no EOD appended) or
`{"input_ids": [...]}`. Each document is scored on its own (no packing across documents), in
windows of at most --max-len tokens; the loss is the mean over all predicted tokens. Prints one
JSON object with `loss`, `tokens`, `documents`, `perplexity`, `malformed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

from megaqwen.cli_common import add_version_flag, silence_known_warnings

log = logging.getLogger("megaqwen.eval")


def read_documents(path: Path, tokenizer_loader) -> tuple[list[list[int]], int]:
    """Token-id lists from a jsonl file; malformed rows are reported and skipped."""
    docs: list[list[int]] = []
    malformed = 0
    tokenizer = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                    ids = [int(i) for i in row["input_ids"]]
                elif isinstance(row, dict) and isinstance(row.get("text"), str):
                    tokenizer = tokenizer or tokenizer_loader()
                    ids = tokenizer.encode(row["text"], add_special_tokens=False)
                else:
                    raise ValueError('row has neither a string "text" nor a list "input_ids"')
            except (ValueError, TypeError) as e:
                malformed += 1
                log.warning("%s:%d: skipped malformed row (%s)", path, lineno, e)
                continue
            docs.append(ids)
    return docs, malformed


@torch.no_grad()
def document_loss(model, docs: list[list[int]], max_len: int, device: torch.device) -> tuple[float, int]:
    """Summed next-token loss and predicted-token count over documents, one window at a time."""
    total, count = 0.0, 0
    vocab = model.cfg.vocab_size
    for ids in docs:
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the model's vocabulary [0, {vocab})")
        for start in range(0, max(len(ids) - 1, 0), max_len):
            window = torch.tensor(ids[start:start + max_len + 1], device=device)
            if window.numel() < 2:
                continue
            parts = model(window[None, :-1], labels=window[None, 1:])
            total += parts.sum.item()
            count += int(parts.count)
    return total, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megaqwen-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("loss", help="mean next-token loss on a jsonl file")
    p.add_argument("--checkpoint", required=True,
                   help="native checkpoint (step folder, checkpoints/ or run folder) or HF folder")
    p.add_argument("--data", required=True, help='jsonl, one document per row: {"text": ...} or '
                   '{"input_ids": [...]}')
    p.add_argument("--max-len", type=int, default=2048, help="tokens per scoring window")
    p.add_argument("--max-docs", type=int, default=0, help="score only the first N documents (0: all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    args = parser.parse_args(argv)
    silence_known_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from megaqwen.convert.hf import load_pretrained
    from megaqwen.parallel.setup import resolve_device
    from megaqwen.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    data = Path(args.data)
    if not data.exists():
        print(f"megaqwen-eval: error: data file {data} not found", file=sys.stderr)
        return 2
    try:
        model = load_pretrained(args.checkpoint, device=device).eval()
        docs, malformed = read_documents(data, load_tokenizer)
        if args.max_docs > 0:
            docs = docs[:args.max_docs]
        total, count = document_loss(model, docs, args.max_len, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"megaqwen-eval: error: {e}", file=sys.stderr)
        return 2
    if count == 0:
        print(f"megaqwen-eval: error: {data} has no document with at least 2 tokens", file=sys.stderr)
        return 2
    loss = total / count
    print(json.dumps({"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count,
                      "documents": len(docs), "malformed": malformed,
                      "checkpoint": str(args.checkpoint)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
