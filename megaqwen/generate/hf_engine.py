"""The hf engine: transformers `generate` on an HF folder (the slow fallback, and the reference the
native engine's greedy output is tested against).

Batches are left-padded with an attention mask (transformers derives the same per-row positions as
the native engine). Log-probs are log_softmax of the raw logits transformers returns per step
(`output_logits`), at the chosen token: the same quantity as the native engine's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaqwen.generate.api import Completion, SamplingParams

PAD_ID = 0


class HFEngine:
    def __init__(self, path: str | Path | None = None, model=None, device: str | torch.device = "cpu"):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        if path is not None:
            self.hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype="auto")
        elif model is not None:
            self.hf = self._from_model(model)
        else:
            raise ValueError("hf engine needs an HF folder (path=) or a model to export")
        self.hf.to(self.device).eval()

    @staticmethod
    def _from_model(model):
        """A transformers model holding `model`'s weights (exported in memory, one process)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from megaqwen.generate.native import unwrap
        from megaqwen.models.spec import get_spec

        inner = unwrap(model)
        dtype = next(inner.parameters()).dtype
        d = get_spec(inner.cfg).hf.config_to_hf(inner.cfg, dtype)
        config = AutoConfig.for_model(**d)
        hf = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
        HFEngine._load(hf, model)
        return hf

    @staticmethod
    def _load(hf, model) -> None:
        from megaqwen.generate.weights import full_hf_weights

        state = dict(full_hf_weights(model))
        missing, unexpected = hf.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied: transformers ties it
        if missing or unexpected:
            raise ValueError(f"hf engine: weights do not fit transformers' model: missing {missing}, "
                             f"unexpected {unexpected}")

    def sync_weights(self, model) -> None:
        """Copy the trainer's weights (whole, one process) into the transformers model."""
        self._load(self.hf, model)
        self.hf.tie_weights()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        outs = [Completion(list(map(int, p))) for p in prompts]
        if not prompts:
            return outs
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty (generation needs at least one token)")
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kw = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=0, pad_token_id=PAD_ID,
                  eos_token_id=list(params.stop_token_ids) or None, return_dict_in_generate=True,
                  output_logits=True, use_cache=True)
        if params.is_greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k or None)
        devices = [self.device] if self.device.type == "cuda" else []
        if params.row_seeds is not None:
            raise ValueError("SamplingParams.row_seeds (one seed per prompt) is supported by the native "
                             "engine only: give one seed (`seed`) per call")
        # transformers samples from torch's global RNG: seed it inside a fork, so the caller's
        # stream (the trainer's) is left where it was
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if params.seed is not None and not params.is_greedy:
                torch.manual_seed(params.seed)
            res = self.hf.generate(ids.to(self.device), attention_mask=mask.to(self.device), **kw)
        new = res.sequences[:, width:].cpu()
        logp = torch.stack(res.logits, 1).float().log_softmax(-1).cpu()  # (B, steps, V)
        stops = set(params.stop_token_ids)
        for i, out in enumerate(outs):
            for step, t in enumerate(new[i].tolist()):
                out.token_ids.append(t)
                out.logprobs.append(float(logp[i, step, t]))
                if t in stops:
                    out.finish_reason = "stop"
                    break
        return outs
