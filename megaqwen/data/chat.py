"""Chat records (SFT conversations, DPO preference pairs) -> token shard + parallel loss-mask shard.

`megaqwen-data tokenize --format sft|dpo` (and tests) call `tokenize_chat`. Formats:

- sft: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}` (assistant
  turns may carry `tool_calls` and then null content).
- dpo: `{"prompt": str | [messages], "chosen": str | [messages], "rejected": ...}` (`messages` is accepted
  for `prompt`; a list-valued chosen/rejected is the assistant turn(s) that follow the prompt, as TRL's
  conversational format).

Each conversation is rendered with the tokenizer's chat template (the Qwen2.5 one the HF export ships)
and tokenised whole, with control tokens (`<|im_start|>`, `<|im_end|>`) parsed. The loss mask is 1 on
the tokens an assistant turn produces: its content and its closing `<|im_end|>` (what HF's
`return_assistant_tokens_mask` and TRL's `assistant_only_loss` train), 0 on system / user / tool turns,
on the role header `<|im_start|>assistant\\n` and on the `\\n` after `<|im_end|>`. A token belongs to the
turn where it starts. The spans come from the template itself: turn k's text is
render(messages[:k+1]) minus render(messages[:k], add_generation_prompt=True), so the mask follows
whatever template the tokenizer ships. `last_turn_only` keeps only the last assistant turn at 1.

Every document ends with the tokenizer's EOD (`<|endoftext|>`, mask 0), so packing sees its boundary.
A DPO pair is written as two consecutive documents, chosen then rejected, each = templated prompt +
that response, with the mask on the response only.

Output: `PREFIX.bin/.idx` (int32 tokens), `PREFIX.mask.bin/.idx` (uint8, one mask value per token, the
same document sizes), and PREFIX.shard.json with `data_format` ("sft" or "dpo"), `last_turn_only` and
`mask_prefix`. A malformed record is skipped and counted under its reason, with the first line (or
parquet row) numbers in the summary; it never stops the run.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megaqwen.data.indexed import IndexedDatasetBuilder
from megaqwen.data.readers import MAX_EXAMPLES, InputPart, SkipSummary, json_records

log = logging.getLogger("megaqwen.tokenize")
FORMATS = ("sft", "dpo")
ROLES = ("system", "user", "assistant", "tool")
MASK_SUFFIX = ".mask"


class Malformed(ValueError):
    """A record that cannot be used; `reason` is its counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass
class ChatStats:
    output_prefix: str
    data_format: str
    files: int = 0
    records: int = 0  # conversations (sft) or pairs (dpo) written
    documents: int = 0
    tokens: int = 0
    trained_tokens: int = 0  # tokens whose mask is 1
    malformed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # malformed reason -> records
    first_lines: dict[str, list[str]] = field(default_factory=dict)  # reason -> first `file:line`s
    seconds: float = 0.0
    tokenizer: str = ""

    def skip(self, where: str, reason: str) -> None:
        self.malformed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        firsts = self.first_lines.setdefault(reason, [])
        if len(firsts) < MAX_EXAMPLES:
            firsts.append(where)


# ---- validation -------------------------------------------------------------------------------------

def check_message(m: Any) -> dict:
    """One chat turn, validated (raises Malformed); an assistant turn may carry `tool_calls`."""
    if not isinstance(m, dict):
        raise Malformed("message_not_an_object", f"a message is a {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise Malformed("bad_role", f"role {role!r} is not one of {ROLES}")
    content, calls = m.get("content"), m.get("tool_calls")
    if role == "assistant" and calls:
        if content is not None and not isinstance(content, str):
            raise Malformed("content_not_string", f"assistant content is a {type(content).__name__}")
        return {"role": role, "content": content or "", "tool_calls": calls}
    if not isinstance(content, str):
        raise Malformed("content_not_string", f"{role} content is a {type(content).__name__}")
    if role == "assistant" and not content.strip():
        raise Malformed("empty_assistant")
    return {"role": role, "content": content}


def sft_messages(rec: Any) -> list[dict]:
    """The validated messages of an sft record (raises Malformed)."""
    if not isinstance(rec, dict):
        raise Malformed("not_an_object")
    msgs = rec.get("messages")
    if msgs is None:
        raise Malformed("missing_messages")
    if not isinstance(msgs, list) or not msgs:
        raise Malformed("messages_not_a_list")
    out = [check_message(m) for m in msgs]
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise Malformed("no_assistant")
    if roles[0] == "assistant":
        raise Malformed("no_prompt", "the conversation starts with an assistant turn")
    return out


def _turns(value: Any, name: str, as_role: str) -> list[dict]:
    if isinstance(value, str):
        return [check_message({"role": as_role, "content": value})]
    if isinstance(value, list) and value:
        return [check_message(m) for m in value]
    raise Malformed(f"missing_{name}" if value is None else f"{name}_not_text_or_messages")


def dpo_pair(rec: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen turns, rejected turns) of a dpo record (raises Malformed)."""
    if not isinstance(rec, dict):
        raise Malformed("not_an_object")
    prompt = _turns(rec.get("prompt", rec.get("messages")), "prompt", "user")
    if prompt[-1]["role"] == "assistant":
        raise Malformed("prompt_ends_with_assistant")
    chosen = _turns(rec.get("chosen"), "chosen", "assistant")
    rejected = _turns(rec.get("rejected"), "rejected", "assistant")
    for turns in (chosen, rejected):
        if not any(m["role"] == "assistant" for m in turns):
            raise Malformed("no_assistant")
    return prompt, chosen, rejected


# ---- rendering and masking --------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def chat_tokenizer(path: str | None = None):
    """(HF tokenizer with control tokens parsed, TokenizerInfo); its own instance, not the text one."""
    from megaqwen.tokenizer import open_tokenizer

    tok, info = open_tokenizer(path)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer {info.describe()} has no chat template: --format sft/dpo needs one "
                         "(set chat_template in its tokenizer_config.json)")
    if info.eod_id is None:
        raise ValueError(f"tokenizer {info.describe()} has no eos token to end documents with")
    return tok, info


def _render(tok, messages: list[dict], generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_with_spans(tok, messages: list[dict], last_turn_only: bool = False,
                      trained_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The templated text and the [start, end) character spans of the trained assistant turns
    (content + `<|im_end|>`); only turns at index >= trained_from are trained."""
    end_tok = "<|im_end|>"
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k < trained_from:
            continue
        head = _render(tok, messages[:k], generation_prompt=True)
        upto = _render(tok, messages[: k + 1])
        if not upto.startswith(head):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "cannot locate the assistant turns")
        close = upto.rfind(end_tok)
        spans.append((len(head), close + len(end_tok) if close >= len(head) else len(upto)))
    text = _render(tok, messages)
    if last_turn_only:
        spans = spans[-1:]
    return text, spans


def encode_with_mask(tok, eod_id: int, text: str,
                     spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(int32 tokens + EOD, uint8 mask): 1 on tokens that start inside a span."""
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    starts = np.fromiter((s for s, _ in enc.offsets), dtype=np.int64, count=len(enc.ids))
    mask = np.zeros(len(enc.ids) + 1, dtype=np.uint8)
    for a, b in spans:
        mask[:-1] |= ((starts >= a) & (starts < b)).astype(np.uint8)
    return np.asarray([*enc.ids, eod_id], dtype=np.int32), mask


def sft_document(tok, eod_id: int, messages: list[dict], last_turn_only: bool = False):
    text, spans = render_with_spans(tok, messages, last_turn_only)
    return encode_with_mask(tok, eod_id, text, spans)


def dpo_documents(tok, eod_id: int, prompt: list[dict], chosen: list[dict], rejected: list[dict]):
    """The chosen and rejected documents, mask on the response turns only."""
    return [encode_with_mask(tok, eod_id, *render_with_spans(tok, prompt + r, trained_from=len(prompt)))
            for r in (chosen, rejected)]


# ---- the command ------------------------------------------------------------------------------------

def tokenize_chat(files: list[str] | list[InputPart], output_prefix: str, data_format: str = "sft",
                  last_turn_only: bool = False, tokenizer: str | None = None) -> ChatStats:
    """Tokenise chat `files` (jsonl, .gz, .zst, parquet) into a token shard and its mask shard.

    Raises ValueError (and leaves no shard) when no valid record was found.
    """
    if data_format not in FORMATS:
        raise ValueError(f"data format {data_format!r} is not one of {FORMATS}")
    if data_format == "dpo" and last_turn_only:
        raise ValueError("--last-turn-only applies to --format sft (dpo trains the response only)")
    tok, info = chat_tokenizer(tokenizer)
    stats = ChatStats(str(output_prefix), data_format, tokenizer=info.describe())
    paths = [f.path if isinstance(f, InputPart) else str(f) for f in files]
    meta = {"tokenizer": info.to_dict(), "add_eod": True, "data_format": data_format,
            "last_turn_only": last_turn_only, "mask_prefix": Path(f"{output_prefix}{MASK_SUFFIX}").name}
    t0 = time.perf_counter()
    # the mask shard (inner `with`) is finalised before the token shard: a reader never finds the
    # tokens of a chat shard without their mask
    with IndexedDatasetBuilder(output_prefix, dtype=np.int32, meta=meta) as tokens, \
            IndexedDatasetBuilder(f"{output_prefix}{MASK_SUFFIX}", dtype=np.uint8,
                                  meta={"mask_of": Path(str(output_prefix)).name}) as masks:
        for path in paths:
            skips = SkipSummary(path, log)
            unit = "row" if path.endswith(".parquet") else "line"

            def bad(where: str, reason: str, detail: str = "", skips=skips, unit=unit) -> None:
                skips.skip(where, reason, detail, unit)
                stats.skip(where, reason)

            for where, rec in json_records(path, bad):
                try:
                    if data_format == "sft":
                        docs = [sft_document(tok, info.eod_id, sft_messages(rec), last_turn_only)]
                    else:
                        docs = dpo_documents(tok, info.eod_id, *dpo_pair(rec))
                except Malformed as e:
                    bad(where, e.reason, str(e))
                    continue
                except Exception as e:  # noqa: BLE001 - the template raised on this record
                    bad(where, "template_failed", f"{type(e).__name__}: {e}")
                    continue
                for ids, mask in docs:
                    tokens.add_document(ids)
                    masks.add_document(mask)
                    stats.documents += 1
                    stats.tokens += len(ids)
                    stats.trained_tokens += int(mask.sum())
                stats.records += 1
            skips.report()
            stats.files += 1
        if stats.records == 0:
            raise ValueError(f"no valid {data_format} record in {len(paths)} input file(s) "
                             f"({stats.malformed} malformed: {stats.reasons}); nothing written to "
                             f"{output_prefix}")
    stats.seconds = round(time.perf_counter() - t0, 3)
    return stats


def write_chat_summary(stats: ChatStats) -> dict:
    summary = asdict(stats)
    Path(f"{stats.output_prefix}.stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary

