"""The one prompt-file reader (`megaqwen.data.prompts`): malformed lines named by file:line (counted, or
the first one fatal), and its rendering rule (chat template by default, `prompt` as is when raw)."""

from __future__ import annotations

import json
import logging

import pytest

from megaqwen.data.prompts import prompt_ids, read_prompt_records, read_prompts
from megaqwen.data.readers import SkipSummary

USER = {"role": "user", "content": "What is 2 + 3?"}


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_malformed_lines_are_named_by_file_and_line(tmp_path, caplog):
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "2 + 3 =", "answer": "5"},          # 1 good
        "{not json",                                   # 2
        {"question": "no prompt field"},               # 3
        {"prompt": "x", "messages": [USER]},           # 4 both
        "",                                            # 5 blank: not a record
        {"messages": [{"role": "bot", "content": "hi"}]},  # 6 bad role
        ["a", "list"],                                 # 7
        {"prompt": "   "},                             # 8 empty
        {"messages": [USER], "id": 9},                 # 9 good
    ])
    skips = SkipSummary(str(path))
    with caplog.at_level(logging.WARNING):
        recs = read_prompt_records(path, skips)
        skips.report()
    assert [(r.line, r.where) for r in recs] == [(1, f"{path}:1"), (9, f"{path}:9")]
    assert recs[0].record == {"prompt": "2 + 3 =", "answer": "5"}  # the record as read, every field
    assert recs[0].messages() == [{"role": "user", "content": "2 + 3 ="}] and recs[1].messages() == [USER]
    assert dict(skips.skipped) == {"invalid_json": 1, "no_prompt_or_messages": 1, "prompt_and_messages": 1,
                                   "bad_role": 1, "not_an_object": 1, "prompt_not_text": 1}
    assert f"{path}: 6 malformed lines skipped" in caplog.text
    assert "at lines 2, 3, 4, 6, 7, ..." in caplog.text
    # without a SkipSummary the first bad line is the error, named by file:line
    with pytest.raises(ValueError, match=r"p.jsonl:2: not JSON"):
        read_prompt_records(path)
    _write(path, [{"prompt": "ok"}, {"question": "no prompt field"}])
    with pytest.raises(ValueError, match=r"p.jsonl:2: a prompt record needs `prompt` \(a string\) or"):
        read_prompt_records(path)


def test_prompt_and_messages_render_by_one_rule(tmp_path):
    from transformers import AutoTokenizer

    from tests.data.tiny_tokenizer import make_tiny_tokenizer

    # a 300-id BPE (a second to build) with a chat template whose turns end with its control token </s>
    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = prompt_ids(tok, {"prompt": USER["content"]})
    # `prompt` is one user turn through the chat template, with the assistant header
    text = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert text == "<user>What is 2 + 3?</s><assistant>"
    assert chat == prompt_ids(tok, {"messages": [USER]}) == tok.encode(text, add_special_tokens=False)
    assert tok.eos_token_id in chat  # control tokens parsed, not spelled out
    # raw: the `prompt` text as it is; `messages` take the template even then
    assert prompt_ids(tok, {"prompt": USER["content"]}, raw=True) == tok.encode(USER["content"],
                                                                                  add_special_tokens=False)
    assert prompt_ids(tok, {"messages": [USER]}, raw=True) == chat
    # read_prompts: ids + the record; too long or beyond the model's vocabulary is a malformed line
    path = _write(tmp_path / "p.jsonl", [{"prompt": USER["content"], "id": 1}, {"prompt": "words " * 40}])
    skips = SkipSummary(str(path))
    (p,) = read_prompts(path, tok, skips=skips, max_tokens=len(chat))
    assert p.ids == chat and p.record == {"prompt": USER["content"], "id": 1} and p.where == f"{path}:1"
    assert dict(skips.skipped) == {"prompt_too_long": 1}
    with pytest.raises(ValueError, match=r"p.jsonl:1: token id \d+ >= the model's vocabulary 10\b"):
        read_prompts(path, tok, vocab=10)

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(NoTemplate(), {"prompt": "hi"})
