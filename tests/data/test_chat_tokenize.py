"""`megaqwen-data tokenize --format sft|dpo`: the loss mask is exactly the assistant tokens, pairs are
written chosen-then-rejected, malformed records are counted and named, parquet reads the same."""

import json

import numpy as np
import pytest

from megaqwen.data.chat import chat_tokenizer, tokenize_chat
from megaqwen.data.indexed import IndexedDataset, read_meta
from megaqwen.data_pipeline.cli import main
from megaqwen.tokenizer import EOD_ID

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 C in Paris.\n"},
]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer(None)[0]


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _docs(prefix):
    ix = IndexedDataset(prefix)
    return [(np.asarray(ix.get(i)), np.asarray(ix.get_mask(i))) for i in range(len(ix))]


def test_sft_mask_is_exactly_the_assistant_turns(tmp_path, tok):
    stats = tokenize_chat([_write(tmp_path / "c.jsonl", [{"messages": CONVO}])], str(tmp_path / "sft"))
    [(ids, mask)] = _docs(tmp_path / "sft")
    text = tok.apply_chat_template(CONVO, tokenize=False)  # the template the HF export ships
    assert tok.decode(ids[:-1].tolist()) == text and ids[-1] == EOD_ID and mask[-1] == 0
    # hand-built: what each assistant turn produces, content and its <|im_end|>, nothing else
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    trained = ["4.<|im_end|>", call + "<|im_end|>", "Sunny and 21 C in Paris.\n<|im_end|>"]
    assert tok.decode(ids[mask == 1].tolist()) == "".join(trained)
    # ...and every other token is a system / user / tool turn or a role header
    assert "assistant" not in tok.decode(ids[mask == 1].tolist())
    assert "sunny, 21 C" in tok.decode(ids[mask == 0].tolist())
    meta = read_meta(tmp_path / "sft")
    assert meta["data_format"] == "sft" and meta["mask_prefix"] == "sft.mask"
    assert stats.trained_tokens == int(mask.sum()) and stats.records == 1


def test_last_turn_only(tmp_path, tok):
    tokenize_chat([_write(tmp_path / "c.jsonl", [{"messages": CONVO}])], str(tmp_path / "last"),
                  last_turn_only=True)
    [(ids, mask)] = _docs(tmp_path / "last")
    assert tok.decode(ids[mask == 1].tolist()) == "Sunny and 21 C in Paris.\n<|im_end|>"
    assert read_meta(tmp_path / "last")["last_turn_only"] is True


def test_dpo_pairs_are_chosen_then_rejected_with_the_mask_on_the_response(tmp_path, tok):
    recs = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
            {"messages": [{"role": "user", "content": "2+2?"}],
             "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    stats = tokenize_chat([_write(tmp_path / "p.jsonl", recs)], str(tmp_path / "dpo"), "dpo")
    docs = _docs(tmp_path / "dpo")
    assert stats.records == 2 and len(docs) == 4 and read_meta(tmp_path / "dpo")["data_format"] == "dpo"
    want = ["Paris.<|im_end|>", "Rome.<|im_end|>", "4<|im_end|>", "5<|im_end|>"]
    assert [tok.decode(ids[m == 1].tolist()) for ids, m in docs] == want
    prompt = tok.decode(docs[0][0][docs[0][1] == 0].tolist())
    assert "Capital of France?" in prompt and prompt.endswith("<|im_start|>assistant\n\n<|endoftext|>")


def test_malformed_records_are_counted_and_named_and_nothing_else_is_lost(tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [good, "{bad json", {"messages": [{"role": "user", "content": "hi"}]},
             {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
             {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
             {"text": "no messages"}, "", good, "[1, 2]"]
    src = _write(tmp_path / "in.jsonl", lines)
    rc = main(["tokenize", "--format", "sft", "--input", str(src), "--output-prefix", str(tmp_path / "s")])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["records"] == 2 and len(IndexedDataset(tmp_path / "s")) == 2
    assert summary["reasons"] == {"invalid_json": 1, "no_assistant": 1, "bad_role": 1,
                                  "content_not_string": 1, "empty_assistant": 1, "missing_messages": 1,
                                  "not_an_object": 1}
    assert summary["first_lines"]["invalid_json"] == [f"{src}:2"]
    assert summary["first_lines"]["not_an_object"] == [f"{src}:10"]
    assert summary["malformed"] == 7
    assert json.loads((tmp_path / "s.stats.json").read_text())["malformed"] == 7


def test_dpo_malformed_and_all_bad_input(tmp_path, capsys):
    src = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"},
                                        {"prompt": "q", "chosen": 1, "rejected": "b"}])
    rc = main(["tokenize", "--format", "dpo", "--input", str(src), "--output-prefix", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 1 and "no valid dpo record" in err and "missing_rejected" in err
    assert not (tmp_path / "d.bin").exists() and not (tmp_path / "d.mask.bin").exists()


def test_parquet_reads_like_jsonl(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    recs = [{"messages": [{"role": "user", "content": f"echo {w}"}, {"role": "assistant", "content": w}]}
            for w in ("red", "green", "blue")]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "c.parquet")
    tokenize_chat([str(tmp_path / "c.parquet")], str(tmp_path / "pq"))
    tokenize_chat([_write(tmp_path / "c.jsonl", recs)], str(tmp_path / "js"))
    for (a, am), (b, bm) in zip(_docs(tmp_path / "pq"), _docs(tmp_path / "js"), strict=True):
        assert np.array_equal(a, b) and np.array_equal(am, bm)
    prefs = [{"prompt": "q", "chosen": "yes", "rejected": "no"}]
    pq.write_table(pa.Table.from_pylist(prefs), tmp_path / "p.parquet")
    assert tokenize_chat([str(tmp_path / "p.parquet")], str(tmp_path / "pp"), "dpo").documents == 2


def test_shipped_toy_sets_tokenise_cleanly(tmp_path):
    from megaqwen.data.tokenize import shipped_sample_corpus

    samples = shipped_sample_corpus().parent
    sft = tokenize_chat([str(samples / "chat.jsonl")], str(tmp_path / "chat"))
    dpo = tokenize_chat([str(samples / "preferences.jsonl")], str(tmp_path / "prefs"), "dpo")
    assert sft.malformed == 0 and sft.records >= 300 and dpo.malformed == 0 and dpo.records >= 200
    assert (samples / "chat.jsonl").stat().st_size + (samples / "preferences.jsonl").stat().st_size < 300_000
