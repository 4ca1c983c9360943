"""Maths answer checking: pull the final answer out of a response and compare it to the reference.

Extraction, in order: the last `\\boxed{...}` (or `\\fbox{...}`), the last "answer is X" /
"Answer: X", else the last number in the text. Comparison, in order: equal after normalisation
(whitespace, `$`, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, `\\text{}`, degrees, thousands commas),
numerically equal within a relative tolerance (fractions, decimals, percentages, `\\frac{a}{b}`), then
-- only if sympy is installed -- equal as expressions (`\\sqrt`, `\\pi`, `^`, implicit products;
evaluated at three points, never simplified), after a whitelist keeps code away from sympy's eval().
Tuples and lists are compared element by element, in order.
"""

from __future__ import annotations

import cmath
import math
import re

REL_TOL = 1e-6
"""Relative tolerance for numeric answers (absolute 1e-9 near zero)."""
MAX_SYMBOLIC_CHARS = 120
"""Longer expressions skip sympy (parsing is the slow part left)."""
SYMBOLIC_POINTS = (0.5377, -1.3077, 2.7183)
"""Where two expressions with free symbols are evaluated: equal at all three counts as identical.
simplify(a - b) would prove it, but takes 25 s on (x+y+1)^99 - (x+y)^99; an evaluation takes ms."""

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"(?:answer is|answer:)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The final answer in a response, unnormalised; None when there is none."""
    boxed = _last_braced(text, ("\\boxed", "\\fbox"))
    if boxed is not None:
        return boxed
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip()
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _last_braced(text: str, commands: tuple[str, ...]) -> str | None:
    """The content of the last `\\command{...}`, braces balanced."""
    start = max(text.rfind(c + "{") + len(c) + 1 if text.rfind(c + "{") >= 0 else -1 for c in commands)
    if start < 0:
        return None
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def normalise(answer: str) -> str:
    """A canonical spelling: no spaces, `$`, sizing commands, text wrappers, degrees or final period."""
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}|\\mathrm\{\s*([^{}]*)\}|\\mbox\{\s*([^{}]*)\}",
               lambda m: next(g for g in m.groups() if g is not None), s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "^\\circ", "^{\\circ}", "°"):
        s = s.replace(junk, "")
    s = s.replace("\\%", "%").replace("\\cdot", "*").replace("\\times", "*")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]\w*=", "", s)  # "x=3" -> "3"
    # integers with thousands separators, alone or in a list: "1,000" -> "1000" (not "1,2")
    s = re.sub(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])", lambda m: m.group(0).replace(",", ""), s)
    return s


def to_number(s: str) -> float | None:
    """A normalised answer's value when it is a plain number: 0.5, -3, 1/2, \\frac{1}{2}, -\\frac12, 1e-3.
    Percentages are handled by `equivalent` (50% matches 50 and 0.5)."""
    frac = re.fullmatch(r"(-?)\\frac\{?(-?[\d.]+)\}?\{?(-?[\d.]+)\}?", s)
    if frac:
        s = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = _float(num.strip("()")), _float(den.strip("()"))
        return a / b if a is not None and b not in (None, 0.0) else None
    return _float(s)


def _float(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def equivalent(response_answer: str | None, reference: str | float | int) -> bool:
    """Whether `response_answer` (as extracted) means the same as `reference`."""
    if response_answer is None:
        return False
    a, b = normalise(response_answer), normalise(str(reference))
    if a == b:
        return True
    parts_a, parts_b = _split_top_level(a), _split_top_level(b)
    if len(parts_a) > 1 or len(parts_b) > 1:
        return len(parts_a) == len(parts_b) and all(_same(x, y) for x, y in zip(parts_a, parts_b))
    return _same(a, b)


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = _values(a), _values(b)
    if va and vb:
        return any(math.isclose(x, y, rel_tol=REL_TOL, abs_tol=1e-9) for x in va for y in vb)
    return _symbolic_equal(a, b)


def _values(s: str) -> list[float]:
    """What a number may mean: `50%` is 50 or 0.5 (graders accept either spelling of a percentage)."""
    if s.endswith("%"):
        v = to_number(s[:-1])
        return [] if v is None else [v, v / 100]
    v = to_number(s)
    return [] if v is None else [v]


def _split_top_level(s: str) -> list[str]:
    """Elements of a tuple/list answer: "(1,2)" / "1,2" -> ["1", "2"]; brackets stripped once."""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        s = s[1:-1]
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _latex_to_sympy(s: str) -> str:
    s = s.replace("{", "(").replace("}", ")")
    s = re.sub(r"\\frac\(([^()]*)\)\(([^()]*)\)", r"((\1)/(\2))", s)
    s = re.sub(r"\\sqrt\[(\d+)\]\(([^()]*)\)", r"((\2)**(1/\1))", s)
    s = s.replace("\\sqrt", "sqrt").replace("\\pi", "pi").replace("^", "**").replace("\\", "")
    # "2xy" is 2*x*y: every other run of letters becomes a product of one-letter variables
    return re.sub(r"[a-zA-Z]+", lambda m: m[0] if m[0] in ("sqrt", "pi") else "*".join(m[0]), s)


_SAFE_CHARS = re.compile(r"[0-9a-zA-Z+\-*/(). ]*")
_NAMES = re.compile(r"[a-zA-Z]+")
_POWER = re.compile(r"\*\*(\(-?(\d{1,2}|[a-zA-Z])(/\d{1,2})?\)|-?\d{1,2}(?!\d)|[a-zA-Z])(?!\*\*)")


def _safe_for_sympy(expr: str) -> bool:
    """parse_expr runs eval() and evaluates integer powers: a model's text reaches sympy only as
    digits, operators, single-letter variables, sqrt and pi, with small non-nested exponents (so no
    attribute access, no calls other than sqrt, no 9**9**9)."""
    return (bool(_SAFE_CHARS.fullmatch(expr)) and not re.search(r"[a-zA-Z)]\s*\.", expr)
            and all(len(n) == 1 or n in ("sqrt", "pi") for n in _NAMES.findall(expr))
            and expr.count("**") == len(_POWER.findall(expr)))


def _symbolic_equal(a: str, b: str) -> bool:
    """Equal values -- exact constants compared numerically, expressions at SYMBOLIC_POINTS -- when
    sympy is installed and both parse; False otherwise."""
    if max(len(a), len(b)) > MAX_SYMBOLIC_CHARS:
        return False
    a, b = _latex_to_sympy(a), _latex_to_sympy(b)
    if not (_safe_for_sympy(a) and _safe_for_sympy(b)):
        return False
    try:
        from sympy.parsing.sympy_parser import (
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:
        return False
    transforms = standard_transformations + (implicit_multiplication_application,)
    try:
        ea = parse_expr(a, transformations=transforms, evaluate=True)
        eb = parse_expr(b, transformations=transforms, evaluate=True)
        names = sorted(ea.free_symbols | eb.free_symbols, key=str)
        for k in range(len(SYMBOLIC_POINTS) if names else 1):
            point = {n: SYMBOLIC_POINTS[(k + j) % len(SYMBOLIC_POINTS)] for j, n in enumerate(names)}
            va, vb = complex(ea.evalf(subs=point)), complex(eb.evalf(subs=point))
            if not cmath.isclose(va, vb, rel_tol=REL_TOL, abs_tol=1e-9):
                return False
        return True
    except Exception:  # noqa: BLE001 -- unparsable answers are simply not equal
        return False
