"""megaqwen-generate: completions for a jsonl of prompts, written as jsonl.

    megaqwen-generate --checkpoint runs/sft --prompts in.jsonl --output out.jsonl --max-new-tokens 256 \
        [--greedy | --temperature 0.7 --top-p 0.9 --top-k 50 --seed 0] [--engine native|hf|vllm]

`--checkpoint`: a run folder, a native checkpoint (step folder) or an HF folder. Each input line is
an object with `prompt` (text: one user turn) or `messages` (chat turns), rendered with the chat
template and the assistant generation prompt (`megaqwen.data.prompts`); `--raw-prompts` tokenises a
`prompt` as it is instead (a base model continuing text). Each output line is the input record plus
`completion` (decoded text, special tokens dropped), `token_ids` and `finish_reason`. Malformed lines
are counted and named (file:line) and skipped, never fatal. Generation stops at the tokenizer's end
of text and <|im_end|> unless `--stop-token-ids` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from megaqwen.generate.api import KINDS, SamplingParams, build_engine

log = logging.getLogger("megaqwen.generate")


def _parser() -> argparse.ArgumentParser:
    from megaqwen.cli_common import add_version_flag

    p = argparse.ArgumentParser(prog="megaqwen-generate", description=__doc__.split("\n\n")[0])
    add_version_flag(p)
    p.add_argument("--checkpoint", required=True, help="run folder, native checkpoint or HF folder")
    p.add_argument("--prompts", required=True, help="jsonl with `prompt` or `messages` per line")
    p.add_argument("--raw-prompts", action="store_true",
                   help="tokenise `prompt` text as it is (default: as a user turn in the chat template)")
    p.add_argument("--output", required=True, help="jsonl to write (input record + completion)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--greedy", action="store_true", help="arg-max decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same completions)")
    p.add_argument("--stop-token-ids", type=int, nargs="*", default=None,
                   help="default: the tokenizer's end of text and <|im_end|>")
    p.add_argument("--engine", choices=KINDS, default="native")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the checkpoint's if it has one, else Qwen2.5's)")
    return p


def _tokenizer(args):
    from megaqwen.tokenizer import open_tokenizer

    path = args.tokenizer
    if path is None and (Path(args.checkpoint) / "tokenizer.json").is_file():
        path = args.checkpoint
    return open_tokenizer(path)


def _stop_ids(args, tok) -> tuple[int, ...]:
    if args.stop_token_ids is not None:
        return tuple(args.stop_token_ids)
    ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tok.unk_token_id))


def _engine(args):
    ckpt = Path(args.checkpoint)
    if args.engine == "native":
        from megaqwen.generate.loading import load_model

        model = load_model(ckpt, args.device)
        return build_engine("native", model), model.cfg.vocab_size
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"--engine {args.engine} needs an HF folder (config.json); {ckpt} is not one: "
                         f"export it with `megaqwen-convert to-hf {ckpt} OUT` or use --engine native")
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    return build_engine(args.engine, path=ckpt, device=args.device), vocab


def main(argv: list[str] | None = None) -> int:
    from megaqwen.cli_common import silence_known_warnings
    from megaqwen.data.prompts import read_prompts
    from megaqwen.data.readers import SkipSummary

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    silence_known_warnings()
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, greedy=args.greedy, seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"megaqwen-generate: {e}") from e
    if args.batch_size < 1:
        raise SystemExit(f"megaqwen-generate: --batch-size must be >= 1, got {args.batch_size}")
    tok, info = _tokenizer(args)
    engine, vocab = _engine(args)
    params.stop_token_ids = _stop_ids(args, tok)
    skips = SkipSummary(str(args.prompts), log)
    try:
        items = read_prompts(args.prompts, tok, raw=args.raw_prompts, skips=skips, vocab=vocab)
    except ValueError as e:  # the tokenizer cannot render them (no chat template)
        raise SystemExit(f"megaqwen-generate: {e}") from e
    skips.report()
    log.info("megaqwen-generate: %d prompts (%s engine, tokenizer %s), stop at %s",
             len(items), args.engine, info.describe(), list(params.stop_token_ids))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    start, tokens = time.perf_counter(), 0
    with open(args.output, "w", encoding="utf-8") as f:
        for b in range(0, len(items), args.batch_size):
            batch = items[b:b + args.batch_size]
            if params.seed is not None:  # each batch its own seed: reruns with the same flags repeat
                params.seed = args.seed + b
            outs = engine.generate([p.ids for p in batch], params)
            for p, o in zip(batch, outs):
                rec = {**p.record, "completion": tok.decode(o.token_ids, skip_special_tokens=True),
                       "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            tokens += sum(len(o.token_ids) for o in outs)
            done, took = b + len(batch), time.perf_counter() - start
            eta = took / done * (len(items) - done)
            log.info("generate: %d/%d prompts, %d tokens, %.1f tokens/s, ETA %.0f s",
                     done, len(items), tokens, tokens / max(took, 1e-9), eta)
    skipped = sum(skips.skipped.values())
    log.info("wrote %s (%d completions%s)", args.output, len(items),
             f", {skipped} malformed lines skipped" if skipped else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
