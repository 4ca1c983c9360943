"""`megaqwen-data verify-pairs`: DPO pairs from responses a checkpoint samples and verifiers check.

    megaqwen-data verify-pairs --prompts tasks.jsonl --checkpoint hf/my-run --samples 8 --output pairs.jsonl

Each line of --prompts is `{"prompt"|"messages", "answer"}` (maths: the final answer is extracted
from \\boxed{}, "answer is X" or the last number and compared numerically or, with sympy installed,
symbolically) or `{"prompt"|"messages", "tests"}` (code: Python asserts run after the response's last
fenced code block in a sandbox with wall-clock, CPU, memory and file-size limits and no network).
--samples responses are drawn per prompt with transformers `generate` (temperature sampling, the
folder's chat template), or with `--engine native` by megaqwen's batched KV-cache decoder; a pair
`{"prompt"|"messages", "chosen", "rejected", "source"}` is written
only where one response passes and another fails (`megaqwen-data tokenize --format dpo` reads it).
The run prints a JSON summary (prompts, samples, passed, pairs, failures by reason, the sandbox
isolation that applied), also written to OUTPUT.summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from megaqwen.data_pipeline.verify.pairs import build_pairs, read_tasks, summary_dict
from megaqwen.rewards.sandbox import SandboxConfig


def run(args: argparse.Namespace, generate=None) -> int:
    """`generate` replaces the checkpoint's sampler (tests pass canned responses)."""
    try:
        tasks = read_tasks(args.prompts)
        sandbox = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb)
    except (OSError, ValueError) as e:
        print(f"megaqwen-data verify-pairs: {e}", file=sys.stderr)
        return 2
    if generate is None and args.engine == "hf":
        from megaqwen.data_pipeline.verify.hf_generate import hf_generator

        generate = hf_generator(args.checkpoint, args.max_new_tokens, args.temperature, args.top_p,
                                args.seed, args.device)
    elif generate is None:
        from megaqwen.data_pipeline.verify.hf_generate import engine_generator

        generate = engine_generator(args.checkpoint, args.engine, args.max_new_tokens, args.temperature,
                                    args.top_p, args.seed, args.device)
    try:
        summary = build_pairs(tasks, generate, args.samples, args.output, sandbox, args.pairs_per_prompt,
                              args.batch_prompts, args.workers, args.log_every, source=args.checkpoint)
    except ValueError as e:
        print(f"megaqwen-data verify-pairs: {e}", file=sys.stderr)
        return 2
    text = json.dumps(summary_dict(summary))
    with open(f"{args.output}.summary.json", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify-pairs",
        help="sample responses from a checkpoint, check them (maths answers, code tests), write DPO pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompts", required=True,
                   help="jsonl: {prompt|messages, answer} or {prompt|messages, tests}")
    p.add_argument("--checkpoint", required=True,
                   help="Hugging Face folder (e.g. from megaqwen-convert to-hf); with --engine native "
                        "also a run folder or native checkpoint")
    p.add_argument("--engine", choices=["hf", "native", "vllm"], default="hf",
                   help="sampler: hf (transformers generate per prompt, the default), native (our "
                        "batched KV-cache decoder, megaqwen.generate) or vllm (GPU)")
    p.add_argument("--output", required=True, help="pairs jsonl; the summary goes to OUTPUT.summary.json")
    p.add_argument("--samples", type=int, default=8, help="responses sampled per prompt (>= 2)")
    p.add_argument("--pairs-per-prompt", type=int, default=1, help="most pairs kept per prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts sampled before their checks run")
    p.add_argument("--workers", type=int, default=2, help="sandboxed checks run at once")
    p.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds per code check")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per code check, MiB")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines")
    p.set_defaults(func=run)
