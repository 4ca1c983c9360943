import json

import pytest

from megaqwen.tokenizer import EOD_ID, QWEN25_ADDED_TOKENS, default_tokenizer_dir, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_vocabulary_and_control_tokens(tok):
    assert tok.vocab_size == 151_643  # regular byte-level BPE tokens
    assert len(tok) == 151_665  # + the 22 Qwen2.5 control tokens, none of Qwen3's four extras
    ids = {tok.convert_tokens_to_ids(c): c for c, _ in QWEN25_ADDED_TOKENS.values()}
    assert ids == {i: c for i, (c, _) in QWEN25_ADDED_TOKENS.items()}
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643 == EOD_ID == tok.eod_id == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644 == tok.im_start_id
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645 == tok.im_end_id
    for name, tid in [
        ("<|object_ref_start|>", 151646),
        ("<|box_start|>", 151648),
        ("<|vision_start|>", 151652),
        ("<tool_call>", 151657),
        ("<|fim_prefix|>", 151659),
        ("<|repo_name|>", 151663),
        ("<|file_sep|>", 151664),
    ]:
        assert tok.convert_tokens_to_ids(name) == tid
    assert "<think>" not in tok.get_vocab()  # Qwen3-only token removed
    assert tok.bos_token is None


def test_round_trip_mixed_text_without_bos(tok):
    text = "Hello, world! 你好，世界。\ndef f(x):\n    return x ** 2  # émoji 🤗\tend  "
    ids = tok.encode(text)
    assert ids[:4] == [9707, 11, 1879, 0]  # "Hello" "," " world" "!": no BOS in front
    assert tok.decode(ids) == text
    assert max(ids) < 151_643  # plain text never yields control tokens
    assert tok.encode("a<|im_end|>b")[1] == 151645  # but their strings do map to them


def test_chat_template_is_qwen25_chatml(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    turns = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 你好<|im_end|>\n"
    assert text == turns + "<|im_start|>assistant\n"
    default = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert default == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
    )
    ids = tok.encode(text)
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def shipped_spec():
    return json.loads((default_tokenizer_dir() / "tokenizer.json").read_text())


def test_missing_control_tokens_are_added_with_official_ids(tmp_path, shipped_spec):
    spec = dict(shipped_spec)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < 151650]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path)
    assert len(tok) == 151_665 and tok.convert_tokens_to_ids("<|file_sep|>") == 151664


def test_wrong_token_at_official_id_is_rejected(tmp_path, shipped_spec):
    spec = dict(shipped_spec)
    spec["added_tokens"] = [dict(t) for t in spec["added_tokens"]]
    spec["added_tokens"][1]["content"] = "<|bogus|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="151644"):
        load_tokenizer(tmp_path)
