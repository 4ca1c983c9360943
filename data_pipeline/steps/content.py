"""Content type (prose / code / math) from cheap signals, before any filter or embedding runs.

Signals, strongest first:
1. file signals in the record: a path, file name or URL with a source-code extension (.py, .js ...)
   or .tex, or a programming-language field (`lang: python`);
2. markup: Markdown code fences, LaTeX environments and `$...$` math spans;
3. line shape: the share of lines that look like code (keywords at the start, `;` `{` `}` at the
   end, assignments, comments, closing brackets), and of lines that are equations.

"code" covers raw source files and tutorials whose fenced / code-like lines hold at least
`min_code_fraction` of the characters; "math" covers LaTeX sources and prose whose math spans,
LaTeX commands and equation lines are dense enough. Everything else is "prose". The decision and
its fractions go to `metadata.content_type` / `metadata.content_signals`; the filter router, the
normaliser and the domain classifier read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step

CONTENT_TYPES = ("prose", "code", "math")


def _names(words: str) -> list[str]:
    return words.split()


CODE_EXTENSIONS = frozenset(
    _names(
        "py pyi ipynb js mjs cjs jsx ts tsx java c h cc cpp cxx hpp hh cs go rs rb php pl pm sh bash zsh "
        "ps1 bat sql kt kts swift scala lua r jl m mm hs ml mli ex exs erl clj dart f f90 f95 vb groovy "
        "gradle cmake mk makefile dockerfile proto vue svelte asm s zig nim v sv vhd vhdl"
    )
)
MATH_EXTENSIONS = frozenset({"tex", "ltx", "sty", "cls", "bib"})
PROGRAMMING_LANGUAGES = frozenset(
    _names(
        "python javascript typescript java c c++ cpp c# csharp go golang rust ruby php perl shell bash sql "
        "kotlin swift scala lua r julia haskell ocaml elixir erlang clojure dart fortran matlab "
        "objective-c assembly zig"
    )
)
_FILE_KEYS = ("path", "file_path", "filepath", "filename", "file_name", "file", "url", "source")
_LANG_KEYS = ("programming_language", "lang", "language")

# definitions and imports at the start of a line: nearly never prose, and a docstring-heavy source file
# (half its lines English) still has many of them
_DEFINITION = re.compile(
    r"^\s*(def \w+\s*\(|class \w+[(:]|import [\w.]+|from [\w.]+ import |#include\s*[<\"]|package [\w.]+;?$|"
    r"func \w+\(|fn \w+|public (static |final )*(class|interface|void|int|String)\b|function \w+\s*\(|"
    r"(export )?(const|let|var) \w+\s*=|(pub )?struct \w+|impl\b|using namespace |#!/)",
    re.MULTILINE,
)
_FENCE = re.compile(r"^(\s*)(```|~~~)")
_CODE_START = re.compile(
    r"^(def |class |import |from [\w.]+ import |return\b|if\s*\(|if .*:$|elif |else\s*[:{]|for\s*\(|"
    r"for .* in .*:$|while\s*[(]|while .*:$|try\s*[:{]|except\b|finally\s*[:{]|catch\s*\(|with .*:$|"
    r"async |await |function\b|const |let |var |public |private |protected |static |#include|#define|"
    r"#ifn?def|#endif|#pragma|package |func |fn |impl |struct |enum |use |mod |module |interface |"
    r"export |namespace |template\s*<|typedef |@\w+|print\(|console\.|System\.|std::|self\.|this\.|"
    r"raise |yield |assert |lambda |switch\s*\(|case .*:$|break;|continue;|end$|begin$|"
    r"SELECT |INSERT |UPDATE |DELETE |CREATE |ALTER |DROP |FROM |WHERE |JOIN |"
    r"\$ |>>> |\.\.\. |pip |npm |git |cd |sudo |echo |export |curl |docker )"
)
_CODE_END = re.compile(r"([;{}\[\](,]|\)\s*[;{:]?|=>|->|\\|:=|\+=|\|\||&&)$")
_ASSIGN = re.compile(r"^[\w.\[\]'\"]+\s*(=|\+=|-=|\*=|/=|:=|==|!=|<-)\s*\S")
_CALL = re.compile(r"^[\w.$]+(\[[^\]]*\])?\([^()]*(\([^()]*\)[^()]*)*\)\s*;?$")
_COMMENT = re.compile(r"^(//|/\*|\*/|\* |\*$|#!|<!--|--\s|;;|%\s)")
_CLOSERS = re.compile(r"^[\])}]+[;,)]*$")

_MATH_SPAN = re.compile(
    r"\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|(?<![\\$\w])\$(?=[^\s$])[^$\n]{1,300}?(?<=[^\s\\])\$(?![\w$])",
    re.DOTALL,
)
_LATEX_ENV = re.compile(
    r"\\begin\{(equation|align|gather|multline|eqnarray|theorem|lemma|proof|proposition|corollary|"
    r"definition|cases|matrix|pmatrix|bmatrix|array)\*?\}"
)
_LATEX_CMD = re.compile(
    r"\\(frac|sum|int|prod|lim|sqrt|alpha|beta|gamma|delta|epsilon|theta|lambda|mu|sigma|pi|omega|"
    r"partial|nabla|infty|cdot|times|leq|geq|neq|approx|mathbb|mathcal|mathrm|left|right|ldots|cdots|"
    r"in|subset|forall|exists|rightarrow|Rightarrow|mapsto|binom|section|subsection|label|ref|cite|"
    r"documentclass|usepackage|begin|end|textbf|emph|item)\b"
)
_LATEX_SOURCE = re.compile(r"\\documentclass|\\begin\{document\}|\\usepackage|\\section\*?\{")
_MATH_SYMBOLS = "=+−×÷±≤≥≠≈∑∫√∞∂∇∈∉⊂⊆∀∃→⇒↦πθλσμ²³^"
_EQUATION_LINE = re.compile(r"[=<>≤≥≈]")
# what tells a math span from "$5 and $": an operator, a command, a sub/superscript or a lone variable
_MATHY_SPAN = re.compile(r"[=<>^_\\+*/≤≥≠≈]|^\s*[A-Za-z]\s*$|[A-Za-z]\(|\d[A-Za-z]")


def _extension_hint(metadata: dict[str, Any]) -> str | None:
    for key in _LANG_KEYS:
        v = metadata.get(key)
        if isinstance(v, str) and v.lower() in PROGRAMMING_LANGUAGES:
            return "code"
    for key in _FILE_KEYS:
        v = metadata.get(key)
        if not isinstance(v, str) or not v:
            continue
        name = v.rsplit("?", 1)[0].rsplit("/", 1)[-1].lower()
        if name in ("makefile", "dockerfile", "cmakelists.txt"):
            return "code"
        ext = name.rsplit(".", 1)[-1] if "." in name else ""
        if ext in CODE_EXTENSIONS:
            return "code"
        if ext in MATH_EXTENSIONS:
            return "math"
    return None


_TRAILING_COMMENT = re.compile(r"\s{2,}(#|//).*$")


def is_code_line(line: str) -> bool:
    s = _TRAILING_COMMENT.sub("", line.strip()) if "  " in line else line.strip()
    if not s:
        return False
    if _CODE_START.match(s) or _COMMENT.match(s) or _CLOSERS.match(s):
        return True
    if _CODE_END.search(s) and (len(s.split()) <= 12 or s.endswith((";", "{", "}"))):
        return True
    return bool(_ASSIGN.match(s) or _CALL.match(s))


def is_equation_line(line: str) -> bool:
    s = line.strip()
    if not s or not _EQUATION_LINE.search(s):
        return False
    # an equation is mostly symbols, digits and one-letter variables, not words
    words = re.findall(r"[^\W\d_]{2,}", s)
    return sum(len(w) for w in words) <= 0.5 * len(s.replace(" ", ""))


@dataclass
class Signals:
    code_fraction: float  # of non-blank characters: in code fences or code-like lines
    definitions: int  # lines that define or import (def, class, import, #include, function ...)
    lines: int  # non-blank lines
    fenced_fraction: float  # of non-blank characters: inside Markdown code fences
    math_fraction: float  # of characters: in math spans, LaTeX commands and equation lines
    latex_commands: int
    latex_source: bool
    hint: str | None
    math_spans: int = 0  # math spans that hold an operator, a command or a lone variable (not prices)


def signals(text: str, metadata: dict[str, Any]) -> Signals:
    lines = text.split("\n")
    total = code = fenced = eq = 0
    in_fence = False
    for line in lines:
        n = len(line.strip())
        if _FENCE.match(line):
            in_fence = not in_fence
            code += n
            fenced += n
            total += n
            continue
        if not n:
            continue
        total += n
        if in_fence:
            code += n
            fenced += n
        elif is_code_line(line):
            code += n
        elif is_equation_line(line):
            eq += n
    found = [m.group(0) for m in _MATH_SPAN.finditer(text)]
    spans = sum(len(m) for m in found)
    cmds = _LATEX_CMD.findall(text)
    math_chars = spans + eq + sum(len(c) + 1 for c in cmds)
    total = max(total, 1)
    return Signals(
        code_fraction=code / total,
        definitions=len(_DEFINITION.findall(text)),
        lines=sum(1 for ln in lines if ln.strip()),
        fenced_fraction=fenced / total,
        math_fraction=min(math_chars / max(len(text), 1), 1.0),
        latex_commands=len(cmds) + len(_LATEX_ENV.findall(text)),
        latex_source=bool(_LATEX_SOURCE.search(text)),
        hint=_extension_hint(metadata),
        math_spans=sum(bool(_MATHY_SPAN.search(m.strip("$\\()[]"))) for m in found),
    )


@dataclass
class ContentTypeConfig:
    min_code_fraction: float = 0.35
    """share of non-blank characters in code fences / code-like lines from which a document is code."""
    min_definitions: int = 3
    """definition / import lines (def, class, import, #include, function ...) that make a document code
    when they are also at least 4% of its lines (docstring-heavy source files)."""
    min_fenced_fraction: float = 0.15
    """share of non-blank characters inside Markdown code fences from which a document is a code
    tutorial (fences are explicit markup, so less is needed than for bare code-like lines)."""
    min_math_fraction: float = 0.08
    """share of characters in math spans, LaTeX commands and equation lines from which it is math."""
    min_latex_commands: int = 4
    """LaTeX math commands / environments that make a document math on their own (with 1 per 400 chars)."""
    min_math_spans: int = 2
    """inline ($...$, \\(...\\)) or display ($$...$$, \\[...\\]) spans holding an operator, a LaTeX
    command or a lone variable that make a document math (prose with a few equations: its short spans
    are under `min_math_fraction`, and the prose filters read them as non-words); 0 disables."""
    use_file_hints: bool = True
    """trust path / file name / URL extensions and programming-language fields in the record."""


def classify(
    text: str, metadata: dict[str, Any], cfg: ContentTypeConfig | None = None
) -> tuple[str, Signals]:
    cfg = cfg or ContentTypeConfig()
    sig = signals(text, metadata)
    if cfg.use_file_hints and sig.hint is not None:
        return sig.hint, sig
    dense_latex = sig.latex_commands >= cfg.min_latex_commands and sig.latex_commands * 400 >= len(text)
    spans = cfg.min_math_spans > 0 and sig.math_spans >= cfg.min_math_spans
    is_math = sig.latex_source or sig.math_fraction >= cfg.min_math_fraction or dense_latex or spans
    defined = sig.definitions >= cfg.min_definitions and sig.definitions >= 0.04 * sig.lines
    fenced = sig.fenced_fraction >= cfg.min_fenced_fraction
    is_code = sig.code_fraction >= cfg.min_code_fraction or fenced or defined
    if is_code and is_math:
        # a LaTeX source's \commands and a code tutorial's equations both score on the other side
        mathy = sig.latex_source or (sig.math_fraction > sig.code_fraction and not defined)
        return ("math" if mathy else "code"), sig
    if is_code:
        return "code", sig
    if is_math:
        return "math", sig
    return "prose", sig


def content_type(doc: Document, cfg: ContentTypeConfig | None = None) -> str:
    """The document's content type, classified once and kept in its metadata."""
    ct = doc.metadata.get("content_type")
    if ct not in CONTENT_TYPES or "content_signals" not in doc.metadata:  # (not ours: an input field)
        ct, sig = classify(doc.text, doc.metadata, cfg)
        doc.metadata["content_type"] = ct
        doc.metadata["content_signals"] = {
            "code": round(sig.code_fraction, 3),
            "math": round(sig.math_fraction, 3),
            **({"hint": sig.hint} if sig.hint else {}),
        }
    return ct


class ContentType(Step):
    """Labels each document prose / code / math (removes nothing)."""

    name = "content_type"
    Config = ContentTypeConfig

    def process(self, doc: Document) -> str | None:
        doc.metadata.pop("content_type", None)  # a stale label from an earlier run is not trusted
        self.stats.changes[content_type(doc, self.cfg)] += 1
        return None
