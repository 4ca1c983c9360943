"""Where the judge's next-token log-probabilities come from.

Both backends answer the same question: for each chat (list of messages, rendered with the model's
chat template and an open assistant turn), the log-probability that the assistant's first token is
each of the option tokens ("0".."5", or "A".."M"). Returned as an (N, K) float64 array, -inf where
a token got no probability (only possible in the top_logprobs mode).
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


def load_chat_tokenizer(path: str | None, model_dir: str | None = None):
    """A tokenizer with a chat template: `path`, else the model folder's own, else bundled Qwen2.5."""
    from transformers import AutoTokenizer

    for p in (path, model_dir):
        if (
            p
            and Path(p).is_dir()
            and any((Path(p) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        ):
            tok = AutoTokenizer.from_pretrained(p)
            if tok.chat_template:
                return tok
    from megaqwen.tokenizer import load_tokenizer

    return load_tokenizer()


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def option_token_ids(tokenizer, options: list[str]) -> list[int]:
    ids = []
    for o in options:
        enc = tokenizer.encode(o, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"option {o!r} is {len(enc)} tokens for this tokenizer; options must be single tokens"
            )
        ids.append(enc[0])
    return ids


class LocalBackend:
    """A `transformers` causal LM (batched, left-padded, GPU when present)."""

    def __init__(
        self,
        model_dir: str | None = None,
        tokenizer=None,
        model=None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
    ):
        import torch

        if model is None:
            if not model_dir or not Path(model_dir).is_dir():
                raise FileNotFoundError(f"judge.model {model_dir!r} is not a model folder")
            from transformers import AutoModelForCausalLM

            dev = (
                "cuda"
                if device == "auto" and torch.cuda.is_available()
                else ("cpu" if device == "auto" else device)
            )
            dt = {
                "auto": torch.bfloat16 if dev.startswith("cuda") else torch.float32,
                "float32": torch.float32,
                "bfloat16": torch.bfloat16,
                "float16": torch.float16,
            }[dtype]
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).to(dev)
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else load_chat_tokenizer(None, model_dir)
        self.batch_size = batch_size

    def option_logprobs(self, chats: list[list[dict[str, str]]], options: list[str]) -> np.ndarray:
        import torch

        ids = option_token_ids(self.tokenizer, options)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(chats), self.batch_size):
            seqs = [
                self.tokenizer.encode(render(self.tokenizer, c), add_special_tokens=False)
                for c in chats[i : i + self.batch_size]
            ]
            t = max(len(s) for s in seqs)
            # left padding: the last column is every prompt's last token
            tokens_BT = torch.tensor([[pad] * (t - len(s)) + s for s in seqs], device=dev)
            mask_BT = torch.tensor([[0] * (t - len(s)) + [1] * len(s) for s in seqs], device=dev)
            # positions count real tokens only, so a left-padded prompt sees the same RoPE phases as alone
            pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                # logits_to_keep=1: only the last position's (B, 1, V) logits; all T of them would be
                # B * T * 152k floats (GBs for long prompts) of which only the last column is used
                logits_BV = (
                    self.model(
                        input_ids=tokens_BT, attention_mask=mask_BT, position_ids=pos_BT, logits_to_keep=1
                    )
                    .logits[:, -1]
                    .float()
                )
            out.append(torch.log_softmax(logits_BV, dim=-1)[:, ids].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(options)))


class OpenAIBackend:
    """An OpenAI-compatible server (vLLM, SGLang) over HTTP.

    mode "echo": legacy completions API with `echo=True, max_tokens=0, logprobs=1`: the server
    scores `prompt + option` and returns the log-probability of every prompt token, so the last one
    is exactly log p(option | prompt) (what lm-evaluation-harness does for log-likelihoods). The
    prompt is rendered here with the chat template, so this needs the model's tokenizer.
    mode "top_logprobs": chat completions with `max_tokens=1, logprobs=true, top_logprobs=K`; works
    with any chat server, but options outside the top K get probability 0.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        mode: str = "echo",
        top_logprobs: int = 20,
        tokenizer=None,
        batch_size: int = 8,
        timeout_s: float = 120.0,
        api_key_env: str = "OPENAI_API_KEY",
    ):
        self.base_url = base_url.rstrip("/")
        self.model, self.mode, self.k = model, mode, top_logprobs
        self.tokenizer = tokenizer
        self.batch_size, self.timeout_s = batch_size, timeout_s
        self.api_key = os.environ.get(api_key_env, "EMPTY")
        if mode == "echo" and tokenizer is None:
            raise ValueError("the echo mode renders the chat template locally: pass the model's tokenizer")

    def _post(self, route: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.base_url}/{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.base_url}/{route}: HTTP {e.code}: {e.read()[:500]!r}") from e
        except urllib.error.URLError as e:
            raise RuntimeError(f"{self.base_url}/{route}: cannot reach the judge server ({e.reason})") from e

    def option_logprobs(self, chats: list[list[dict[str, str]]], options: list[str]) -> np.ndarray:
        if self.mode == "echo":
            return self._echo(chats, options)
        return np.array([self._top(c, options) for c in chats], dtype=np.float64).reshape(
            len(chats), len(options)
        )

    def _echo(self, chats, options) -> np.ndarray:
        k = len(options)
        prompts = [render(self.tokenizer, c) + o for c in chats for o in options]
        lps: list[float] = []
        for i in range(0, len(prompts), self.batch_size * k):
            batch = prompts[i : i + self.batch_size * k]
            resp = self._post(
                "completions",
                {
                    "model": self.model,
                    "prompt": batch,
                    "max_tokens": 0,
                    "echo": True,
                    "logprobs": 1,
                    "temperature": 0.0,
                },
            )
            choices = sorted(resp["choices"], key=lambda c: c["index"])
            if len(choices) != len(batch):
                raise RuntimeError(
                    f"{self.base_url}: asked for {len(batch)} prompts, got {len(choices)} choices"
                )
            for c in choices:
                lp = c["logprobs"]
                if lp["tokens"][-1] not in options:
                    raise RuntimeError(
                        f"{self.base_url}: the last echoed token is {lp['tokens'][-1]!r}, not an "
                        f"option; the option merged with the prompt when tokenised"
                    )
                lps.append(float(lp["token_logprobs"][-1]))
        return np.asarray(lps, dtype=np.float64).reshape(len(chats), k)

    def _top(self, messages, options) -> list[float]:
        resp = self._post(
            "chat/completions",
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": self.k,
                "temperature": 0.0,
            },
        )
        top = resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        by_token = {t["token"]: float(t["logprob"]) for t in top}
        return [by_token.get(o, -math.inf) for o in options]
