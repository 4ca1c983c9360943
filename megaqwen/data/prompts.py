"""Prompt files: the jsonl lines a model answers. One reader for every tool that reads them:
`megaqwen-generate`, the GRPO prompt stream (`rollout.prompts`), `megaqwen-data verify-pairs` and the
curation pipeline's synthesize stage.

A line (plain, .gz or .zst jsonl) is a JSON object with exactly one of
- `prompt`: a non-empty string, or
- `messages`: a non-empty list of chat turns `{"role": system|user|assistant|tool, "content": str}`,
plus whatever its caller reads (`answer`, `tests`, `id`, ...), kept in the record as read.

Rendering, one rule (`prompt_ids`): the prompt's chat turns (`messages` as they are; a `prompt` string as
one user turn, the form the DPO tokeniser and the rewards give it too) go through the tokenizer's chat
template with the assistant generation header, and the text is tokenised with its control tokens
parsed, no BOS added. Only a caller that asks for `raw` (`megaqwen-generate --raw-prompts`: a base
model continuing text) tokenises a `prompt` string as it is; `messages` always take the template.

A malformed line (not JSON, not an object, neither or both of the fields, a bad turn, a prompt too
long for the caller) is named by `file:line`: with a `SkipSummary` it is counted under its reason and
skipped; without one the first is a ValueError (a prompt stream with a silent hole would move every
later prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaqwen.data.chat import Malformed, check_message
from megaqwen.data.readers import SkipSummary, json_records


@dataclass(frozen=True)
class PromptRecord:
    """One good line of a prompt file."""

    record: dict[str, Any]
    """The JSON object as read (every field)."""
    where: str
    """`file:line`."""

    @property
    def line(self) -> int:
        return int(self.where.rsplit(":", 1)[1])

    def messages(self) -> list[dict]:
        return prompt_messages(self.record)


@dataclass(frozen=True)
class Prompt:
    """A prompt record and its token ids (`prompt_ids`)."""

    record: dict[str, Any]
    ids: list[int]
    where: str


def check_prompt(rec: Any) -> dict[str, Any]:
    """`rec` if it is a prompt record (module docstring); Malformed naming the reason otherwise."""
    if not isinstance(rec, dict):
        raise Malformed("not_an_object", f"a prompt record is a JSON object, not a {type(rec).__name__}")
    if ("prompt" in rec) == ("messages" in rec):
        raise Malformed("prompt_and_messages" if "prompt" in rec else "no_prompt_or_messages",
                        "a prompt record needs `prompt` (a string) or `messages` (a list of chat turns), "
                        "exactly one of them")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise Malformed("prompt_not_text", "`prompt` must be a non-empty string")
        return rec
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise Malformed("messages_not_a_list", "`messages` must be a non-empty list of chat turns")
    for m in msgs:
        check_message(m)
    return rec


def prompt_messages(rec: dict[str, Any]) -> list[dict]:
    """The prompt as chat turns: `messages` as they are, a `prompt` string as one user turn."""
    if "messages" in rec:
        return list(rec["messages"])
    if "prompt" in rec:
        return [{"role": "user", "content": rec["prompt"]}]
    raise Malformed("no_prompt_or_messages", f"a prompt record has neither `prompt` nor `messages`: keys "
                    f"{sorted(rec)}")


def prompt_ids(tok, rec: dict[str, Any], raw: bool = False) -> list[int]:
    """The token ids of a prompt record by the module's rule (`raw`: a `prompt` string as it is). A
    ValueError when the template is needed and the tokenizer has none."""
    if raw and "prompt" in rec:
        text = rec["prompt"]
    else:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"the tokenizer ({getattr(tok, 'name_or_path', '') or type(tok).__name__}) has "
                             "no chat template, which prompts are rendered with (`messages` always, "
                             "`prompt` unless raw): set chat_template in its tokenizer_config.json")
        text = tok.apply_chat_template(prompt_messages(rec), tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))


def _on_bad(skips: SkipSummary | None):
    """Count a malformed line in `skips`, or (None) raise it as a ValueError naming `file:line`."""
    def bad(where: str, reason: str, detail: str = "") -> None:
        if skips is not None:
            skips.skip(where, reason, detail, "line")
        elif reason == "invalid_json":
            raise ValueError(f"{where}: not JSON ({detail})")
        else:
            raise ValueError(f"{where}: {detail or reason}")

    return bad


def read_prompt_records(path: str | Path, skips: SkipSummary | None = None) -> list[PromptRecord]:
    """The prompt records of a jsonl file, in file order; malformed lines counted in `skips`, or (None)
    the first one a ValueError naming its `file:line`."""
    bad, out = _on_bad(skips), []
    for where, rec in json_records(str(path), bad):
        try:
            out.append(PromptRecord(check_prompt(rec), where))
        except Malformed as e:
            bad(where, e.reason, str(e))
    return out


def read_prompts(path: str | Path, tok, raw: bool = False, skips: SkipSummary | None = None,
                 max_tokens: int | None = None, vocab: int | None = None) -> list[Prompt]:
    """`read_prompt_records` rendered with `prompt_ids`; a prompt over `max_tokens` tokens or holding
    an id >= `vocab` (the model's) is a malformed line too."""
    bad, out = _on_bad(skips), []
    for p in read_prompt_records(path, skips):
        ids = prompt_ids(tok, p.record, raw)
        if max_tokens is not None and len(ids) > max_tokens:
            bad(p.where, "prompt_too_long", f"the prompt is {len(ids)} tokens, more than {max_tokens}")
        elif vocab is not None and max(ids) >= vocab:
            bad(p.where, "token_beyond_model_vocab", f"token id {max(ids)} >= the model's vocabulary {vocab}")
        else:
            out.append(Prompt(p.record, ids, p.where))
    return out
