"""`megaqwen-convert`: checkpoints between Hugging Face folders and megaqwen's native format.

    megaqwen-convert from-hf HF_DIR OUT_DIR
    megaqwen-convert to-hf CKPT_DIR HF_DIR      (CKPT_DIR: a step folder, checkpoints/ or a run folder)
"""

from __future__ import annotations

import argparse
import logging
import sys

from megaqwen.cli_common import add_version_flag, silence_known_warnings
from megaqwen.convert.hf import from_hf, to_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megaqwen-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("from-hf", help="HF Qwen2 folder -> megaqwen checkpoint")
    p.add_argument("hf_dir", help="folder with config.json and model.safetensors (or an index + shards)")
    p.add_argument("out_dir", help="megaqwen checkpoint folder to write (DCP + meta.json, step 0)")
    p = sub.add_parser("to-hf", help="megaqwen checkpoint -> HF Qwen2 folder")
    p.add_argument("ckpt_dir", help="step folder, checkpoints/ folder or run folder (its latest checkpoint)")
    p.add_argument("hf_dir", help="HF folder to write: config.json, generation_config.json, safetensors, "
                   "tokenizer")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (GiB)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    args = parser.parse_args(argv)
    silence_known_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "from-hf":
            print(from_hf(args.hf_dir, args.out_dir))
        else:
            print(to_hf(args.ckpt_dir, args.hf_dir, int(args.max_shard_gb * 2**30),
                        tokenizer=not args.no_tokenizer))
    except (FileNotFoundError, ValueError) as e:
        print(f"megaqwen-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
