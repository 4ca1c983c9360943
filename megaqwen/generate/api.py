"""The generation engine interface: one call for GRPO rollouts, verifier pairs and `megaqwen-generate`.

    engine = build_engine("native", model)            # the trainer's model, used in place
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=64, temperature=1.0, seed=0))
    outs[i].token_ids, outs[i].logprobs, outs[i].finish_reason
    engine.sync_weights(model)                        # after each optimizer step

Backends (`build_engine(kind, ...)`):
  native  `megaqwen.generate.native.NativeEngine`: our model with a KV cache, in this process, on
          the trainer's own (possibly tensor-parallel) modules; the CPU path and the reference.
  hf      `megaqwen.generate.hf_engine.HFEngine`: transformers `generate` on an HF folder (slow
          fallback; `sync_weights` loads the trainer's weights into it, converted to HF names).
  vllm    `megaqwen.generate.vllm_engine.VLLMEngine`: a vLLM `LLM` in this process (GPU), weights
          pushed through its `load_weights` after each update, no checkpoint round trip.

Prompts are token id lists (no padding, any lengths); text in and out is the caller's (the CLI
tokenises). Every backend returns one `Completion` per prompt, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

KINDS = ("native", "hf", "vllm")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    """Generated tokens per prompt at most (a stop token counts and is kept)."""
    temperature: float = 1.0
    """Logits are divided by it before sampling; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off)."""
    greedy: bool = False
    """Arg-max decoding (ignores temperature, top_p, top_k, seed)."""
    stop_token_ids: tuple[int, ...] = ()
    """A row ends after emitting one of these (kept as its last token; finish_reason "stop")."""
    seed: int | None = None
    """Sampling RNG seed: the same seed, prompts and weights give the same tokens. None: drawn from
    torch's global RNG (under tp: rank 0's draw, broadcast)."""
    row_seeds: tuple[int, ...] | None = None
    """One seed per prompt (native engine only; replaces `seed`): row i draws from its own generator,
    so its tokens do not depend on the other rows of the call (one batched call samples what one call
    per row would)."""
    return_routed_experts: bool = False
    """MoE models, native engine only: fill `Completion.routed_experts` with the experts every sparse
    layer chose for each token the engine fed (routing replay, `grpo.routing_replay`)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.row_seeds is not None:
            self.row_seeds = tuple(int(s) for s in self.row_seeds)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class Completion:
    prompt_ids: list[int]
    """The prompt as given."""
    token_ids: list[int] = field(default_factory=list)
    """Generated tokens (a stop token, when one ended the row, is the last)."""
    logprobs: list[float] = field(default_factory=list)
    """Per generated token: log_softmax of the model's raw logits (temperature 1, before top-k /
    top-p) at that token, fp32: the quantity the trainer's `token_logprobs` recomputes, not the
    log-probability under the tempered / truncated sampling distribution. The hf backend returns
    the same quantity from its scores; vllm returns vLLM's logprobs of the sampled token."""
    finish_reason: str = "length"
    """"stop" (a stop token was emitted) or "length" (max_new_tokens reached)."""
    routed_experts: object = None
    """With `SamplingParams.return_routed_experts`: an int16 tensor (P + G - 1, num_layers, K) of the
    experts each sparse layer routed each fed token to (the prompt's P tokens, then every generated
    token but the last, which is never fed); -1 in dense layers."""


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One Completion per prompt, in order. Under tp every rank of the group calls it with the
        same prompts and params (and gets the same completions)."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine generate with `model`'s current weights (the trainer's, possibly sharded);
        a no-op for native, which runs the model in place."""
        ...


def build_engine(kind: str, model=None, *, path=None, tp_group=None, sync_group=None,
                 autocast_dtype=None, device=None, shards=None, **kwargs) -> Engine:
    """An engine of `kind` (native | hf | vllm).

    native: `model` (the trainer's, in place; may be wrapped by DDP/FSDP2/DeepSpeed, tp-sharded)
            or `path` (a native checkpoint, run folder or HF folder, loaded whole on `device`).
            `tp_group`: the model's tensor-parallel group (default: the one its plan installed);
            `sync_group`: ranks whose forwards must stay in lockstep although their prompts differ
            (FSDP2 / ZeRO-3 gather parameters inside each forward); `autocast_dtype`: the trainer's.
    hf:     `path` to an HF folder, or `model` (exported in memory to transformers, single process).
    vllm:   `path` (HF folder the LLM starts from) and `model`/`shards` for `sync_weights`;
            `kwargs` go to `vllm.LLM`.
    """
    if kind == "native":
        from megaqwen.generate.native import NativeEngine

        if model is None:
            if path is None:
                raise ValueError("native engine needs the trainer's model or a checkpoint path")
            from megaqwen.generate.loading import load_model

            model = load_model(path, device or "cpu")
        return NativeEngine(model, tp_group=tp_group, sync_group=sync_group,
                            autocast_dtype=autocast_dtype)
    if kind == "hf":
        from megaqwen.generate.hf_engine import HFEngine

        return HFEngine(path=path, model=model, device=device or "cpu")
    if kind == "vllm":
        from megaqwen.generate.vllm_engine import VLLMEngine

        return VLLMEngine(path=path, model=model, shards=shards, tp_group=tp_group, **kwargs)
    raise ValueError(f"generation engine {kind!r} is unknown; choose from {list(KINDS)}")
