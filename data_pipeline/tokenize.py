"""`megaqwen-data tokenize`: jsonl (plain, .gz, .zst) / parquet / HF datasets text -> int32 Megatron shard.

    megaqwen-data tokenize --input 'raw/*.jsonl.zst' --output-prefix shards/web [--workers 4]

Every document is tokenised with the Qwen2.5 BPE and ends with `<|endoftext|>` (151643) unless
`--no-eod`. Control-token strings that occur literally in the text (e.g. a web page quoting
"<|endoftext|>") are encoded as ordinary text, so the only EODs in a shard are the appended ones and
document boundaries stay exact. Input order is kept whatever the number of workers, so the same
inputs always give byte-identical shards. Files are read by `megaqwen.data.readers.Reader`: a malformed
record (bad JSON, missing or non-string text) is logged with its file and line, counted, and
skipped; bytes that are not UTF-8 are decoded with replacement and lone surrogates repaired (both
counted under `repaired`); a document the tokenizer still rejects is skipped, counted under `failed`
and logged with file, line and id; a damaged compressed file keeps the records before the damage and
is listed. The run ends by printing a JSON summary, also written to PREFIX.stats.json. The work is
done by `megaqwen.data.tokenize` (shared with the trainer's `data.path=sample`).

    megaqwen-data tokenize --format sft --input chats.jsonl --output-prefix shards/chat [--last-turn-only]
    megaqwen-data tokenize --format dpo --input prefs.parquet --output-prefix shards/prefs

`--format sft` reads OpenAI-style `messages` (system / user / assistant / tool turns), `--format dpo`
reads `{"prompt"|"messages", "chosen", "rejected"}`; both apply the tokenizer's chat template (the
Qwen2.5 one the HF export ships) and write a parallel uint8 loss-mask shard PREFIX.mask.bin/.idx (1 on
assistant content and its `<|im_end|>`); a dpo pair is two consecutive documents, chosen then rejected.
Malformed records are counted per reason with their first line numbers (`megaqwen.data.chat`). Chat
formats tokenise in one process (--workers is ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from megaqwen.data.chat import tokenize_chat, write_chat_summary
from megaqwen.data.readers import expand_inputs
from megaqwen.data.tokenize import tokenize_files, write_summary

log = logging.getLogger("megaqwen.tokenize")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 1:
        print(
            f"megaqwen-data tokenize: --batch-size ({args.batch_size}) and --workers ({args.workers}) "
            "must be >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        files = expand_inputs(args.input)
    except FileNotFoundError as e:
        print(f"megaqwen-data tokenize: {e}", file=sys.stderr)
        return 2
    if args.format != "text":
        return _run_chat(args, files)
    if args.last_turn_only:
        print("megaqwen-data tokenize: --last-turn-only needs --format sft", file=sys.stderr)
        return 2
    try:
        stats = tokenize_files(
            files,
            args.output_prefix,
            args.text_key,
            args.workers,
            args.batch_size,
            add_eod=not args.no_eod,
            log_every_s=args.log_every,
            tokenizer=args.tokenizer,
        )
    except (ValueError, OSError) as e:
        print(f"megaqwen-data tokenize: {e}", file=sys.stderr)
        return 1
    print(json.dumps(write_summary(stats)))
    if stats.corrupt_files:
        log.error("%d corrupt or truncated file(s): %s", len(stats.corrupt_files), stats.corrupt_files)
    # malformed records: the reader logged one summary line per input file (and the JSON counts them)
    if stats.failed:
        log.warning("%d record(s) rejected by the tokenizer (first ones logged above)", stats.failed)
    return 0


def _run_chat(args: argparse.Namespace, files) -> int:
    try:
        stats = tokenize_chat(files, args.output_prefix, args.format, args.last_turn_only, args.tokenizer)
    except (ValueError, OSError) as e:
        print(f"megaqwen-data tokenize: {e}", file=sys.stderr)
        return 1
    print(json.dumps(write_chat_summary(stats)))
    if stats.malformed:
        log.warning("%d malformed record(s) skipped: %s; first at %s", stats.malformed, stats.reasons,
                    stats.first_lines)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="turn text files (jsonl, parquet) into one token shard for megaqwen-train, without filtering",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_GLOB",
        help="jsonl, jsonl.gz, jsonl.zst, parquet files or HF datasets folders (globs allowed, quote them)",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    p.add_argument("--format", choices=("text", "sft", "dpo"), default="text",
                   help="text: pretraining documents (default); sft: chat `messages` with a loss mask on "
                        "assistant tokens; dpo: prompt/chosen/rejected pairs")
    p.add_argument("--last-turn-only", action="store_true",
                   help="--format sft: train only the last assistant turn of each conversation")
    p.add_argument("--text-key", default="text", help="json key / parquet column holding the text")
    p.add_argument("--workers", type=int, default=1, help="tokeniser processes (1: in-process)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per tokeniser call")
    p.add_argument("--no-eod", action="store_true", help="do not append <|endoftext|> to each document")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="Hugging Face tokenizer folder (default: the shipped Qwen2.5 one), recorded in "
                        "PREFIX.shard.json; the trainer refuses shards of another tokenizer than its model's")
    p.set_defaults(func=run)
