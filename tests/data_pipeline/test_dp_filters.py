"""Each heuristic step on hand-made documents whose fate is known."""

from __future__ import annotations

import pytest

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.filters import C4Filter, FineWebFilter, GopherQuality, GopherRepetition
from megaqwen.data_pipeline.steps.langid import LanguageId
from megaqwen.data_pipeline.steps.normalize import Normalize
from megaqwen.data_pipeline.steps.pii import PiiMasking

GOOD = (
    "The river rises in the hills to the north of the town and flows south for about forty kilometres. "
    "In the nineteenth century it powered a dozen mills, and the remains of several can still be seen "
    "along the footpath that follows its bank. Local historians have collected photographs and letters "
    "that describe daily life in the mill houses, where whole families worked long hours. Today the "
    "valley is a nature reserve, and volunteers count the otters and kingfishers that have returned "
    "to the cleaner water. Walkers should keep to the marked paths during the nesting season."
)


def run(step, text):
    doc = Document("d", text)
    kept = step(doc)
    return (None if kept is None else kept.text), step.stats


def test_good_document_passes_every_filter():
    for step in (GopherQuality(), GopherRepetition(), C4Filter(), FineWebFilter()):
        text, stats = run(step, GOOD)
        assert text is not None, f"{step.name} removed a clean paragraph: {stats.reasons}"


@pytest.mark.parametrize(
    "text,reason",
    [
        ("Too short to be useful.", "too_few_words"),
        ("a b c d e f g h i j " * 10, "avg_word_too_short"),
        (GOOD + " " + "# ... " * 20, "symbol_word_ratio"),
        (
            "\n".join(f"- item number {i} with a few more words here and there" for i in range(12)),
            "bullet_lines",
        ),
        ("\n".join(["Something happened and then..."] * 3 + [GOOD]), "ellipsis_lines"),
        (" ".join(["1234 5678 91011 12.5 %%% ==> 42 the and of"] * 10), "alpha_words_ratio"),
        (" ".join(["river mills valley otters kingfishers water walkers paths"] * 8), "stop_words"),
    ],
)
def test_gopher_quality_rules(text, reason):
    out, stats = run(GopherQuality(), text)
    assert out is None and stats.reasons == {f"gopher_quality:{reason}": 1}


@pytest.mark.parametrize(
    "text,reason",
    [
        ("\n\n".join(["Same paragraph here, repeated."] * 4 + [GOOD]), "dup_para_frac"),
        (
            "\n".join(["Buy now, stock is limited!"] * 5 + ["A different line entirely, and longer."] * 1),
            "dup_line_frac",
        ),
        ("cheap watches " * 60, "top_2gram"),
        (GOOD + " " + " ".join(GOOD.split()[:40]), "dup_5gram"),
    ],
)
def test_gopher_repetition_rules(text, reason):
    out, stats = run(GopherRepetition(), text)
    assert out is None and stats.reasons == {f"gopher_repetition:{reason}": 1}


def test_c4_line_rules_rewrite_and_document_rules():
    page = (
        "Home\nThis site uses cookies to improve your experience.\nPlease enable JavaScript to continue.\n"
        + GOOD
        + " See also [1].\nShort line"
    )
    out, stats = run(C4Filter(), page)
    assert out == GOOD + " See also ." and stats.modified == 1
    assert run(C4Filter(), GOOD + " Lorem ipsum dolor sit amet.")[1].reasons == {"c4:lorem_ipsum": 1}
    assert run(C4Filter(), GOOD + " Use {braces}.")[1].reasons == {"c4:curly_bracket": 1}
    assert run(C4Filter(C4Filter.Config(filter_curly_bracket=False)), GOOD + " Use {braces}.")[0] is not None
    assert run(C4Filter(), "One sentence. Two sentences. Three.")[1].reasons == {"c4:too_few_sentences": 1}


@pytest.mark.parametrize(
    "text,reason",
    [
        ("\n".join(["a title without punctuation", "another line without it"] * 5), "line_punct_ratio"),
        ("\n".join(["Short.", "Menu.", "Cart.", GOOD]), "short_line_ratio"),
        (
            "\n".join(
                [
                    GOOD,
                    "This exact line appears twice in the page.",
                    "This exact line appears twice in the page.",
                ]
            ),
            "char_dup_ratio",
        ),
        # many newlines per word: two-word lines, long and punctuated so only the list rule fires
        ("\n".join(f"Entry {i}: {'x' * 40}." for i in range(30)), "list_ratio"),
    ],
)
def test_fineweb_rules(text, reason):
    out, stats = run(FineWebFilter(), text)
    assert out is None and stats.reasons == {f"fineweb:{reason}": 1}


def test_normalize_unicode_and_whitespace():
    out, stats = run(Normalize(), "  Cafe\u0301\u200b  au\t\tlait \r\n\n\n\nsecond\u00a0 line  ")
    assert out == "Café au lait\n\nsecond line" and stats.modified == 1
    assert run(Normalize(), " \u200b \n ")[1].reasons == {"normalize:empty": 1}


def test_langid_keeps_english_removes_others():
    assert run(LanguageId(), GOOD)[0] is not None
    fr = (
        "La bibliothèque municipale ouvre ses portes tous les matins à neuf heures pour les lecteurs "
        "du quartier."
    )
    assert run(LanguageId(), fr)[1].reasons == {"langid:language_fr": 1}


def test_pii_masks_emails_and_valid_ips_only():
    text = (
        "Mail jane.doe@example.com or ops@mail.example.org; server 192.168.1.20, v2.1.0.4 no, "
        "999.1.1.1 no, fe80::1."
    )
    out, stats = run(PiiMasking(), text)
    assert out == ("Mail <EMAIL> or <EMAIL>; server <IP_ADDRESS>, v2.1.0.4 no, 999.1.1.1 no, <IP_ADDRESS>.")
    assert stats.modified == 1 and stats.removed == 0
