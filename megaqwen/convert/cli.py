"""`megaqwen-convert`: checkpoints between Hugging Face folders and megaqwen's native format.

    megaqwen-convert from-hf HF_DIR OUT_DIR
    megaqwen-convert to-hf CKPT_DIR HF_DIR      (CKPT_DIR: a step folder, checkpoints/ or a run folder)
    megaqwen-convert to-reward LM OUT_DIR       (an LM, HF or native -> a reward model's start: the LM
        head dropped, a new score head; a head=score checkpoint exports as *ForSequenceClassification)
    torchrun --nproc-per-node N -m megaqwen.convert.cli from-deepspeed CKPT_DIR --out RUN_DIR
        (a checkpoint in DeepSpeed's own format -> DCP, which both engines resume; N: the world
        size it was saved with)
"""

from __future__ import annotations

import argparse
import logging
import os
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
    p = sub.add_parser("to-reward", help="language model -> reward model start (score head, no LM head)")
    p.add_argument("src", help="HF folder or native checkpoint of a language model (e.g. the SFT model)")
    p.add_argument("out_dir", help="megaqwen checkpoint folder to write (train.init_from of a reward run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new score head's Normal(0, init_std)")
    p = sub.add_parser("from-deepspeed", help="DeepSpeed-format checkpoint -> DCP (run under torchrun "
                       "with the world size it was saved with)")
    p.add_argument("ckpt_dir", help="step folder, checkpoints/ folder or run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="run folder to write: OUT/checkpoints/step_N and latest")
    args = parser.parse_args(argv)
    silence_known_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "from-hf":
            print(from_hf(args.hf_dir, args.out_dir))
        elif args.command == "to-reward":
            from megaqwen.convert.reward import to_reward

            print(to_reward(args.src, args.out_dir, args.seed))
        elif args.command == "from-deepspeed":
            from megaqwen.convert.deepspeed import from_deepspeed

            path = from_deepspeed(args.ckpt_dir, args.out)
            if int(os.environ.get("RANK", "0")) == 0:
                print(path)
        else:
            print(to_hf(args.ckpt_dir, args.hf_dir, int(args.max_shard_gb * 2**30),
                        tokenizer=not args.no_tokenizer))
    except (FileNotFoundError, ValueError) as e:
        print(f"megaqwen-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
