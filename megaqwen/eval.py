"""`megaqwen-eval loss --checkpoint PATH --data FILE`: mean next-token loss of a checkpoint
(`passkey` and `ppl-length`: long-context evaluations, see megaqwen/eval_long.py).

PATH is a native checkpoint (step folder, checkpoints/ or run folder) or an HF folder. FILE is
jsonl with one document per row: `{"text": ...}` (Qwen tokenizer, no BOS, no EOD appended) or
`{"input_ids": [...]}`. Each document is scored on its own (no packing across documents), in
windows of at most --max-len tokens; the loss is the mean over all predicted tokens. Prints one
JSON object with `loss`, `tokens`, `documents`, `perplexity`, `malformed`.

Long context at inference (no retraining): `--yarn FACTOR` scales RoPE by YaRN from the trained
length (`--yarn-original`, default the config's max_position_embeddings); `--dca CHUNK LOCAL` runs
Dual Chunk Attention as vLLM does (kernels/dca.py), `--dca-original TOKENS` adds vLLM's length
temperature (HF `original_max_position_embeddings`), `--dca-variant paper` the paper's positions.
`--attention auto` uses DCA when the checkpoint's config has it (HF `dual_chunk_attention_config`).
Under torchrun (`torchrun --nproc-per-node N -m megaqwen.eval loss ...`) the model is
tensor-parallel over the N ranks (loss and ppl-length; rank 0 prints).
Under DCA, RoPE scaling is ignored as vLLM ignores `rope_scaling` next to a DCA config (`--yarn`
with DCA is refused: DCA's YaRN-style temperature is --dca-original).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import torch

from megaqwen.cli_common import add_version_flag, silence_known_warnings

log = logging.getLogger("megaqwen.eval")


def read_documents(path: Path, tokenizer_loader, limit: int = 0) -> tuple[list[list[int]], int]:
    """Token-id lists from a jsonl file (its first `limit` documents when > 0, reading no further);
    malformed rows are skipped, counted and reported in one summary line."""
    from megaqwen.data.readers import SkipSummary

    docs: list[list[int]] = []
    malformed = 0
    tokenizer = None
    skips = SkipSummary(str(path), log)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit and len(docs) == limit:
                break
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
                reason = "invalid_json" if isinstance(e, json.JSONDecodeError) else "no_text_or_input_ids"
                skips.skip(f"{path}:{lineno}", reason, str(e), unit="row")
                continue
            docs.append(ids)
    skips.report()
    return docs, malformed


def long_context_config(cfg, yarn: float | None = None, yarn_original: int | None = None,
                        dca: tuple[int, int] | None = None, dca_original: int | None = None,
                        dca_variant: str | None = None):
    """`cfg` with YaRN and/or DCA settings for evaluation (validated by ModelConfig)."""
    changes = {}
    if yarn is not None:
        changes.update(rope_scaling="yarn", rope_scaling_factor=yarn,
                       rope_original_max_position=yarn_original or cfg.max_position_embeddings)
    if dca is not None:
        changes.update(dca_chunk_size=dca[0], dca_local_size=dca[1])
    if dca_original is not None:
        changes.update(dca_original_max_position=dca_original)
    if dca_variant is not None:
        changes.update(dca_variant=dca_variant)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_for_eval(checkpoint, device, attention: str = "auto", yarn: float | None = None,
                  yarn_original: int | None = None, dca: tuple[int, int] | None = None,
                  dca_original: int | None = None, dca_variant: str | None = None, mesh=None):
    """Model in eval mode from a native or HF checkpoint, with the long-context options applied;
    DCA (`attention` dca, or auto with DCA in the config) swaps the RoPE and attention ops. `mesh`
    (a `ParallelMesh` with tp > 1): the model tensor-parallel over its tp group, each rank loading
    its slices of the full weights."""
    from megaqwen.models.weights import read_weights

    cfg, weights = read_weights(checkpoint)
    cfg = long_context_config(cfg, yarn, yarn_original, dca, dca_original, dca_variant)
    return build_for_eval(cfg, weights, device, attention, mesh, yarn_requested=yarn is not None)


def build_for_eval(cfg, weights: dict[str, torch.Tensor], device, attention: str = "auto", mesh=None,
                   yarn_requested: bool = False):
    """`cfg`'s model in eval mode holding `weights` (full tensors; this rank's slices under tp)."""
    from megaqwen.kernels.dca import dca_config_of, dca_ops
    from megaqwen.kernels.registry import resolve_ops
    from megaqwen.models.spec import get_spec

    if attention not in ("auto", "plain", "dca"):
        raise ValueError(f"attention={attention!r}; choose auto | plain | dca")
    use_dca = attention == "dca" or (attention == "auto" and cfg.dca_chunk_size > 0)
    if use_dca and not cfg.dca_chunk_size:
        raise ValueError("attention=dca needs chunk and local sizes: pass --dca CHUNK LOCAL")
    if use_dca and yarn_requested:
        raise ValueError("--yarn with Dual Chunk Attention: vLLM ignores rope_scaling when a DCA config "
                         "is present, and so does megaqwen; DCA's YaRN-style length temperature is "
                         "--dca-original TOKENS (the trained context)")
    if use_dca and cfg.rope_scaling != "none":
        log.warning("model.rope_scaling=%s is not applied under Dual Chunk Attention (as vLLM: its DCA "
                    "RoPE uses rope_theta alone)", cfg.rope_scaling)
    ops = resolve_ops(device=torch.device(device).type)
    if use_dca:
        ops = dca_ops(ops, dca_config_of(cfg))
    spec = get_spec(cfg)
    if mesh is None or mesh.dims.tp == 1:
        model = spec.build(cfg, ops, device=device)
        model.load_state_dict(weights, strict=True)
        return model.eval()
    from megaqwen.parallel.materialize import materialize
    from megaqwen.parallel.shards import local_tensor

    model = spec.build(cfg, ops, device="meta")
    shards = spec.parallelize_tp(model, mesh)
    missing = sorted(set(dict(model.named_parameters())) - set(weights))
    if missing:
        raise ValueError(f"checkpoint weights lack {missing[:5]}")

    def fill(fqn: str, p: torch.Tensor) -> None:
        box = tuple(slice(a, b) for a, b in shards.box(fqn, p))
        local_tensor(p).copy_(weights[fqn][box])

    return materialize(model, shards, device, filler=fill).eval()


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


def add_long_context_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", default="auto", choices=["auto", "plain", "dca"],
                   help="dca: Dual Chunk Attention; auto: dca when the checkpoint's config has it")
    p.add_argument("--dca", type=int, nargs=2, metavar=("CHUNK", "LOCAL"),
                   help="Dual Chunk Attention window c and local window w (chunks of c - w tokens)")
    p.add_argument("--dca-original", type=int, metavar="TOKENS",
                   help="DCA length temperature from this trained context (vLLM's "
                        "original_max_position_embeddings; 0: off)")
    p.add_argument("--dca-variant", choices=["vllm", "paper"],
                   help="DCA positions: vllm (default, as vLLM/ChunkLlama) | paper (capped at c - 1)")
    p.add_argument("--yarn", type=float, metavar="FACTOR", help="YaRN RoPE scaling factor (e.g. 4)")
    p.add_argument("--yarn-original", type=int, metavar="TOKENS",
                   help="trained context YaRN extends (default: the config's max_position_embeddings)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="native checkpoint (step folder, checkpoints/ or run folder) or HF folder")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    add_long_context_flags(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megaqwen-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("loss", help="mean next-token loss on a jsonl file")
    _common(p)
    p.add_argument("--data", required=True, help='jsonl, one document per row: {"text": ...} or '
                   '{"input_ids": [...]}')
    p.add_argument("--max-len", type=int, default=2048, help="tokens per scoring window")
    p.add_argument("--max-docs", type=int, default=0, help="score only the first N documents (0: all)")
    p = sub.add_parser("passkey", help="passkey retrieval over lengths x depths: table, JSON, heat map")
    _common(p)
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="context lengths (tokens)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=5, help="keys per cell")
    p.add_argument("--out", required=True, help="folder for passkey.json/.md/.png")
    p = sub.add_parser("ppl-length", help="perplexity vs context length: JSON and plot")
    _common(p)
    p.add_argument("--data", required=True, help="jsonl documents, joined into one token stream")
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="context lengths (tokens)")
    p.add_argument("--max-windows", type=int, default=8, help="windows scored per length")
    p.add_argument("--out", required=True, help="folder for ppl_length.json/.png")
    args = parser.parse_args(argv)
    silence_known_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    data = Path(args.data) if getattr(args, "data", None) else None
    if data is not None and not data.exists():
        print(f"megaqwen-eval: error: data file {data} not found", file=sys.stderr)
        return 2
    try:
        device, mesh = _start(args)
        model = load_for_eval(args.checkpoint, device, args.attention, args.yarn, args.yarn_original,
                              tuple(args.dca) if args.dca else None, args.dca_original, args.dca_variant,
                              mesh=mesh)
        result = _run(args, model, data, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"megaqwen-eval: error: {e}", file=sys.stderr)
        return 2
    if result is None:
        return 2
    if mesh is None or mesh.tp_rank == 0:
        print(json.dumps(result))
    return 0


def _start(args) -> tuple[torch.device, object]:
    """(device, tp mesh or None): under torchrun (WORLD_SIZE > 1) every rank joins one tp group and
    holds its slices of the model (`loss` and `ppl-length`; each rank computes the same result)."""
    import os

    from megaqwen.parallel.setup import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return resolve_device(args.device), None
    if args.command == "passkey":
        raise ValueError("passkey reads whole-vocabulary logits: run it in one process (tensor "
                         "parallelism covers `loss` and `ppl-length`)")
    from megaqwen.parallel.config import ParallelConfig
    from megaqwen.parallel.setup import init_distributed

    env = init_distributed(ParallelConfig(tp=world), args.device)
    return env.device, env.mesh


def _run(args, model, data: Path | None, device) -> dict | None:
    from megaqwen import eval_long
    from megaqwen.tokenizer import load_tokenizer

    if args.command == "passkey":
        r = eval_long.run_passkey(model, Path(args.out), args.lengths, args.depths, args.trials, device)
        print(eval_long.passkey_table(r), file=sys.stderr)
        return {"passkey": r["cells"], "png": r["png"], "checkpoint": str(args.checkpoint)}
    docs, malformed = read_documents(data, load_tokenizer, getattr(args, "max_docs", 0))
    if args.command == "ppl-length":
        rows = eval_long.perplexity_by_length(model, docs, args.lengths, args.max_windows, device)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ppl_length.json").write_text(json.dumps(rows, indent=1))
        png = eval_long.plot_perplexity(rows, out / "ppl_length.png")
        return {"ppl_length": rows, "png": str(png), "checkpoint": str(args.checkpoint)}
    if args.max_docs > 0:
        docs = docs[:args.max_docs]
    total, count = document_loss(model, docs, args.max_len, device)
    if count == 0:
        print(f"megaqwen-eval: error: {data} has no document with at least 2 tokens", file=sys.stderr)
        return None
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count,
            "documents": len(docs), "malformed": malformed, "checkpoint": str(args.checkpoint)}


if __name__ == "__main__":
    sys.exit(main())
