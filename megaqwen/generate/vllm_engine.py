"""The vllm engine: a vLLM `LLM` in this process, fed the trainer's weights after every update.

vLLM is a GPU-only optional dependency (not installable on the CPU CI image): importing this module
never imports it; building an engine without it raises ImportError naming the fix.

Weight sync (`sync_weights(model)`): the trainer's parameters are made whole and HF-named by
`megaqwen.generate.weights.full_hf_weights` (tp pieces all-gathered over the tp group, FSDP2 DTensors
`full_tensor()`ed; collective, so every trainer rank calls it) and streamed, one tensor at a time,
into the vLLM model's `load_weights(iterable of (name, tensor))`: the same path vLLM's own loader
uses for safetensors, so its fused q/k/v and gate/up parameters are filled from HF names. No
checkpoint is written. Ranks built without an LLM (`llm=False`: e.g. tp ranks > 0 when only the
first rank of each tp group serves rollouts) take part in the gather and push nothing.

Which vLLM object holds the model differs between versions; `vllm_model` tries the known paths
(V0 `driver_worker.model_runner.model`, V1 in-process `driver_worker.worker.model_runner.model`)
and says which versions it knows when none fits.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from megaqwen.generate.api import Completion, SamplingParams

MODEL_PATHS = (
    "llm_engine.model_executor.driver_worker.model_runner.model",  # vLLM V0
    "llm_engine.model_executor.driver_worker.worker.model_runner.model",  # V1, in-process executor
)


def vllm_unavailable_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return f"vLLM is not installed ({e}); install it on a GPU machine (pip install vllm)"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU"
    return None


def vllm_model(llm):
    """The torch model inside a vLLM `LLM` (has `load_weights`)."""
    for path in MODEL_PATHS:
        obj = llm
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "load_weights"):
            return obj
    raise RuntimeError(f"cannot find the model inside this vLLM LLM (looked at {list(MODEL_PATHS)}); "
                       "run vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) or extend MODEL_PATHS")


class VLLMEngine:
    def __init__(self, path: str | Path | None = None, model=None, shards=None, tp_group=None,
                 llm=None, **llm_kwargs):
        """`path`: the HF folder the LLM starts from (an export of the policy: config, tokenizer);
        `llm`: an LLM already built (tests pass a fake), False for a rank that serves none;
        `llm_kwargs` go to `vllm.LLM` (tensor_parallel_size, gpu_memory_utilization, ...)."""
        self.shards, self.tp_group = shards, tp_group
        if llm is None:
            reason = vllm_unavailable_reason()
            if reason:
                raise ImportError(f"engine=vllm: {reason}; engine=native runs anywhere")
            if path is None:
                raise ValueError("engine=vllm needs the HF folder of the policy (path=)")
            from vllm import LLM

            llm = LLM(model=str(path), **llm_kwargs)
        self.llm = llm or None
        if model is not None:
            self.sync_weights(model)

    def sync_weights(self, model) -> int:
        """Push `model`'s current weights into the LLM; -> number of tensors pushed (0 on a rank
        without an LLM). Collective over the tp group (the gather)."""
        from megaqwen.generate.weights import full_hf_weights

        weights = full_hf_weights(model, self.shards, self.tp_group)
        if self.llm is None:
            return sum(1 for _ in weights)  # still gather: the other ranks wait for our pieces
        count = 0

        def counted(items: Iterable[tuple[str, torch.Tensor]]):
            nonlocal count
            for name, t in items:
                count += 1
                yield name, t

        vllm_model(self.llm).load_weights(counted(weights))
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:  # cached prompt KV was computed with the old weights
            reset()
        return count

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if self.llm is None:
            raise RuntimeError("this rank holds no vLLM engine (built with llm=False)")
        from vllm import SamplingParams as VLLMSamplingParams
        if params.row_seeds is not None:
            raise ValueError("SamplingParams.row_seeds (one seed per prompt) is supported by the native "
                             "engine only: give one seed (`seed`) per call")

        sp = VLLMSamplingParams(
            n=1, max_tokens=params.max_new_tokens,
            temperature=0.0 if params.is_greedy else params.temperature,
            top_p=1.0 if params.is_greedy else params.top_p,
            top_k=(params.top_k or -1) if not params.is_greedy else -1,
            seed=params.seed, stop_token_ids=list(params.stop_token_ids), logprobs=0,
            ignore_eos=True)
        results = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp, use_tqdm=False)
        outs = []
        for p, r in zip(prompts, results):
            o = r.outputs[0]
            lps = [float(step[t].logprob) if step and t in step else float("nan")
                   for t, step in zip(o.token_ids, o.logprobs or [None] * len(o.token_ids))]
            outs.append(Completion(list(p), list(o.token_ids), lps,
                                   "stop" if o.finish_reason == "stop" else "length"))
        return outs
