"""Content-type routing and the filters made for code, math and each language, on hand-made documents."""

from __future__ import annotations

import pytest

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.domains import content_domain
from megaqwen.data_pipeline.steps import build_steps
from megaqwen.data_pipeline.steps.code_filters import CodeQuality
from megaqwen.data_pipeline.steps.content import classify
from megaqwen.data_pipeline.steps.filters import C4Filter, FineWebFilter, GopherQuality, GopherRepetition
from megaqwen.data_pipeline.steps.math_filters import MathQuality
from megaqwen.data_pipeline.steps.normalize import Normalize

PY = '''import os
import sys


def read_config(path):
    """Key = value pairs of a config file."""
    config = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition("=")
            config[key.strip()] = value.strip()
    return config


class Cache:
    def __init__(self, size):
        self.size = size
        self.items = {}

    def get(self, key):
        return self.items.get(key)


if __name__ == "__main__":
    print(read_config(sys.argv[1]))
'''
JS = """const express = require("express");
const app = express();

function range(start, end) {
  const out = [];
  for (let i = start; i < end; i++) {
    out.push(i);
  }
  return out;
}

app.get("/api/range", (req, res) => {
  res.json(range(0, 10));
});
"""
TUTORIAL = (
    "# Reading a config file\n\nIn this tutorial we write a small function that reads key and value "
    "pairs from a file. It is short, but the details matter.\n\n```python\n"
    + PY[PY.index("def") : PY.index("class")]
    + "```\n\nThe function skips nothing yet; in the next part we will handle comments and blank lines too."
)
LATEX = r"""\documentclass{article}
\usepackage{amsmath}
\begin{document}
\section{Partial sums}
We show that the partial sums are bounded, which gives convergence.
\begin{equation}
  \sum_{k=1}^{n} \frac{1}{k^2} \leq 2 - \frac{1}{n}.
\end{equation}
The proof is by induction on $n$: the case $n = 1$ is clear, and the step follows from
$\frac{1}{(n+1)^2} \leq \frac{1}{n} - \frac{1}{n+1}$.
\end{document}
"""
PLAIN_MATH = (
    "Let f(x) = 3x^2 + 2x - 5.\nThen f'(x) = 6x + 2.\nSetting f'(x) = 0 gives x = -1/3.\n"
    "The key observation is that the derivative changes sign only once, so this point is the minimum.\n"
    "f(1) = 3 + 2 - 5 = 0, so x = 1 is a root.\n"
    "We can check the answer by plugging it back into the equation."
)
EN = (
    "The river rises in the hills to the north of the town and flows south for about forty kilometres. "
    "In the nineteenth century it powered a dozen mills, and the remains of several can still be seen "
    "along the footpath that follows its bank. Local historians have collected photographs and letters "
    "that describe daily life in the mill houses, where whole families worked long hours. Today the "
    "valley is a nature reserve, and volunteers count the otters and kingfishers that have returned. "
    "Walkers should keep to the marked paths during the nesting season."
)
ZH = (
    "市议会批准了一项计划，要在冬季洪水到来之前重建河上的那座旧桥。工程师表示，新桥能够通行的自行车和行人数量将是现在的两倍。"
    "许多居民希望车站附近的街道能有更宽的人行道和更好的照明。社区图书馆现在不仅借书，还出借工具、桌游和乐器。"
    "每个星期六上午，志愿者们都会为买不起新车的家庭修理自行车。最近的一项调查发现，如果道路更加安全，大多数人愿意多走路。"
)
DE = (
    "Der Gemeinderat hat beschlossen, die alte Brücke über den Fluss noch vor dem Winter zu erneuern. "
    "Nach Angaben der Ingenieure kann die neue Brücke doppelt so viele Radfahrer aufnehmen wie bisher. "
    "Viele Anwohner wünschen sich breitere Gehwege und eine bessere Beleuchtung in der Nähe des Bahnhofs. "
    "Die Stadtbibliothek verleiht inzwischen nicht nur Bücher, sondern auch Werkzeuge und Brettspiele. "
    "Jeden Samstag treffen sich Freiwillige, um Fahrräder für Familien mit wenig Geld zu reparieren. "
    "Der Wochenmarkt ist in den letzten fünf Jahren von zwölf auf mehr als sechzig Stände gewachsen."
)
RU = (
    "Городской совет утвердил план реконструкции старого моста через реку до начала зимних паводков. "
    "По словам инженеров, новый мост сможет пропускать вдвое больше велосипедистов и пешеходов. "
    "Многие жители просят сделать тротуары шире и улучшить освещение на улицах возле вокзала. "
    "Каждую субботу волонтёры чинят велосипеды для семей, которые не могут купить новые. "
    "Недавний опрос показал, что большинство людей ходили бы пешком чаще, если бы улицы были безопаснее. "
    "За последние пять лет фермерский рынок вырос с двенадцати прилавков до более чем шестидесяти."
)


@pytest.mark.parametrize(
    "text,meta,want",
    [
        (PY, {}, "code"),
        (JS, {}, "code"),
        (TUTORIAL, {}, "code"),
        (LATEX, {}, "math"),
        (PLAIN_MATH, {}, "math"),
        (EN, {}, "prose"),
        (ZH, {}, "prose"),
        (EN, {"path": "src/notes.py"}, "code"),  # a file signal wins
        (EN, {"url": "https://arxiv.org/e-print/paper.tex"}, "math"),
    ],
)
def test_content_type(text, meta, want):
    assert classify(text, meta)[0] == want


def _run(step, text, **meta):
    doc = Document("d", text, dict(meta))
    return step(doc), step.stats


def test_normalize_keeps_code_whitespace_and_cleans_prose():
    code = "def f(x):\r\n\tif x:\r\n        return x  \r\n\r\n\r\n\r\n    return 0\u200b\n"
    out, _ = _run(Normalize(), code)
    assert out.text == "def f(x):\n\tif x:\n        return x  \n\n\n\n    return 0\n"  # only CRLF and U+200B
    out, _ = _run(Normalize(), "  Some   prose\t here  \r\n\n\n\nand more  ")
    assert out.text == "Some prose here\n\nand more"


def test_code_passes_code_filters_and_prose_rules_would_remove_it():
    for text in (PY, JS, TUTORIAL):
        assert _run(CodeQuality(), text)[0] is not None
    # why code must not go through the prose rules
    assert _run(FineWebFilter(), PY)[1].reasons == {"fineweb:short_line_ratio": 1}
    assert _run(C4Filter(C4Filter.Config(filter_curly_bracket=False)), PY)[0] is None


@pytest.mark.parametrize(
    "text,reason",
    [
        ("x = 1\n", "too_short"),
        ("// Code generated by protoc-gen-go. DO NOT EDIT.\n" + PY, "auto_generated"),
        (
            "var a=" + ",".join(f"b{i}=function(c){{return c*{i}}}" for i in range(100)) + ";",
            "max_line_length",
        ),
        ("\n".join("x = [" + "1, " * 40 + "]" for _ in range(30)), "avg_line_length"),
        ("\n".join(["{}[](){}[]()<>;;;;;;::::!!!!"] * 20), "alnum_fraction"),
        (
            'DATA = """\n'
            + "\n".join(["TWFueSBoYW5kcyBtYWtlIGxpZ2h0IHdvcmsuIE1hbnkgaGFuZHMgbWFrZSBsaWdodCB3b3Jr"] * 40)
            + '\n"""\n',
            "encoded_data",
        ),
        ("\n".join(",".join(str(1000 + i * j) for j in range(10)) for i in range(50)), "data_file"),
        (PY + "\n".join(["    result = compute_value(alpha, beta, gamma)"] * 40), "repeated_lines"),
    ],
)
def test_code_quality_rules(text, reason):
    out, stats = _run(CodeQuality(), text)
    assert out is None and stats.reasons == {f"code_quality:{reason}": 1}


def test_math_passes_math_filter_but_not_prose_rules():
    for text in (LATEX, PLAIN_MATH):
        assert _run(MathQuality(), text)[0] is not None
    assert _run(GopherQuality(), PLAIN_MATH)[1].reasons == {"gopher_quality:alpha_words_ratio": 1}


@pytest.mark.parametrize(
    "text,reason",
    [
        ("$x_1 + x_2 = 3$, $y_1 - y_2 = 4$ " * 4 + "so.", "too_few_prose_words"),
        ("#### $$$ %%% @@@ !!! *** ### &&& ^^^ ~~~ " * 10, "alnum_fraction"),
        ("\ufffd" * 50 + " " + PLAIN_MATH, "replacement_chars"),
        (
            "Let x = 1. " + "We now show that the sequence converges and compute its limit. " * 8,
            "repetition_",
        ),
    ],
)
def test_math_quality_rules(text, reason):
    out, stats = _run(MathQuality(), text)
    assert (
        out is None
        and len(stats.reasons) == 1
        and next(iter(stats.reasons)).startswith(f"math_quality:{reason}")
    )


@pytest.mark.parametrize("text,lang", [(ZH, "zh"), (DE, "de"), (RU, "ru"), (EN, "en")])
def test_prose_filters_keep_clean_text_in_its_language(text, lang):
    for step in (GopherQuality(), GopherRepetition(), C4Filter(), FineWebFilter()):
        out, stats = _run(step, text, language=lang)
        assert out is not None, (lang, step.name, stats.reasons)


def test_english_rules_on_other_languages_are_what_removed_them():
    # without a language the English stop words / whitespace words apply (the old behaviour)
    assert _run(GopherQuality(), DE)[1].reasons == {"gopher_quality:stop_words": 1}
    assert _run(GopherQuality(), ZH)[0] is not None  # CJK text is segmented even without a language
    assert _run(GopherQuality(), DE.replace("die ", "").replace("der ", ""), language="de")[0] is not None


def test_forum_thread_with_repeated_ui_lines_is_kept():
    posts = [s.strip() + "." for s in EN.split(". ") if s.strip()]
    thread = "Old mills on the river\n\n" + "\n\n".join(
        f"{u} wrote:\n{p}\nReply" for u, p in zip(["anna", "mike", "anna", "joe", "mike"], posts)
    )
    # as in the shipped configs: C4's line rules (which drop "Reply") run before FineWeb
    doc = Document("t", thread, {"language": "en"})
    chain = (
        GopherRepetition(),
        C4Filter(C4Filter.Config(filter_no_terminal_punct=False)),
        FineWebFilter(FineWebFilter.Config(char_duplicates_ratio=0.1)),
    )
    for step in chain:
        assert step(doc) is not None, step.stats.reasons
    # Gopher's published line rule (every line counts) removed it
    assert _run(GopherRepetition(GopherRepetition.Config(min_line_chars=0)), thread)[0] is None


def test_route_sends_each_type_to_its_filters_and_counts_by_reason():
    (route,) = build_steps([{
        "name": "route",
        "prose": [{"name": "langid", "languages": ["en", "de", "zh"]}, {"name": "gopher_quality"}],
        "code": [{"name": "code_quality"}],
        "math": [{"name": "math_quality"}],
    }])  # fmt: skip
    kept = {}
    for i, t in enumerate([PY, LATEX, EN, ZH, DE, "tiny", "x = 1\n"]):
        doc = Document(str(i), t)
        kept[i] = route(doc) is not None
    assert kept == {0: True, 1: True, 2: True, 3: True, 4: True, 5: False, 6: False}
    rows = {s.name: s for s in route.all_stats()}
    assert rows["route"].changes == {"code": 2, "math": 1, "prose": 4}
    assert rows["code/code_quality"].reasons == {"code/code_quality:too_short": 1}
    assert rows["route"].reasons == {
        "code/code_quality:too_short": 1,
        "prose/gopher_quality:too_few_words": 1,
    }


def test_code_and_math_go_to_their_domains_first():
    tax = {"code": "", "math": "", "news": ""}
    for text, want in ((PY, "code"), (LATEX, "math"), (EN, None)):
        doc = Document("d", text, {"content_type": classify(text, {})[0]})
        assert content_domain(doc, tax) == want
    assert content_domain(Document("d", PY, {"content_type": "code"}), {"news": ""}) is None
