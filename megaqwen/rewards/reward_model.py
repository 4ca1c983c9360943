"""A reward model's score of prompt + completion: part 1's `train.objective=reward` models (a native
checkpoint of a `model.head=score` config) or an HF `Qwen2ForSequenceClassification` folder.

The text is rendered as the reward model was trained on it (`megaqwen.data.chat`: the chat template
over the prompt's turns plus the completion as the assistant turn) and scored at its last token,
the `\\n` after `<|im_end|>`: the token `megaqwen.train.reward` scores a training row at (its last
token before the <|endoftext|> padding), so a sample gets the reward the trained model means. Rows
are right-padded in a batch, which a causal model's last real token never sees. A rendering longer
than the model's `max_position_embeddings` keeps its last tokens (the end of the response) and is
counted in `truncated`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megaqwen.rewards.sample import Sample

log = logging.getLogger(__name__)


class RewardModel:
    """A frozen score-head model on one device, scoring `Sample`s in batches."""

    def __init__(self, model, tokenizer, device: torch.device, batch_size: int = 8):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        self.max_len = model.cfg.max_position_embeddings
        self.pad_id = model.cfg.pad_token_id
        self.truncated = 0
        """Samples whose rendering was cut to max_len tokens so far."""

    @classmethod
    def load(cls, path: str | Path, tokenizer: str | Path | None = None, device: str = "auto",
             batch_size: int = 8) -> RewardModel:
        from megaqwen.data.chat import chat_tokenizer
        from megaqwen.kernels.registry import resolve_ops
        from megaqwen.models.spec import get_spec
        from megaqwen.models.weights import read_weights

        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           "cpu" if device == "auto" else device)
        cfg, weights = read_weights(path)
        if cfg.head != "score":
            raise ValueError(f"reward model {path}: a head={cfg.head} model has no score head (train one "
                             "with train.objective=reward from `megaqwen-convert to-reward`)")
        model = get_spec(cfg).build(cfg, resolve_ops(device=dev.type), device=dev)
        model.load_state_dict(weights, strict=True)
        model.requires_grad_(False)
        if tokenizer is None and (Path(path) / "tokenizer.json").is_file():
            tokenizer = path
        tok, _ = chat_tokenizer(None if tokenizer is None else str(tokenizer))  # cached; needs a template
        log.info("reward model %s on %s", path, dev)
        return cls(model.eval(), tok, dev, batch_size)

    def encode(self, sample: Sample) -> list[int]:
        """Token ids of the rendered prompt + completion (the last max_len of them)."""
        chat = sample.messages() + [{"role": "assistant", "content": sample.completion}]
        text = self.tokenizer.apply_chat_template(chat, tokenize=False)
        ids = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) > self.max_len:
            self.truncated += 1
            ids = ids[-self.max_len:]
        return ids

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> list[float]:
        """Reward of every sample (fp32 score at its last token)."""
        out: list[float] = []
        for i in range(0, len(samples), self.batch_size):
            rows = [self.encode(s) for s in samples[i:i + self.batch_size]]
            out += score_token_ids(self.model, rows, self.pad_id, self.device).tolist()
        return out


def score_token_ids(model, rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """(B,) fp32 scores of a score-head model at each row's last token (rows right-padded)."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    if bool((lengths == 0).any()):
        raise ValueError("a reward-model row is empty: nothing to score")
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    h = model.hidden_states(tokens, positions)
    scores_BT = model.scores(h)
    return scores_BT.gather(1, (lengths - 1)[:, None]).squeeze(1).float().cpu()
