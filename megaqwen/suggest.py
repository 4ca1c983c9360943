"""Closest valid spellings ("did you mean") for misspelt keys and values, and the one check of a
fixed-choice setting.

A leaf module (standard library only) so that every layer can name the closest valid spelling in its
own refusal: `megaqwen.parallel` checks `parallel.cp_mode`, `megaqwen.train` its keys and presets,
`megaqwen-plan` its arguments, all with the same wording.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """` (did you mean X?)` for the closest candidates, or '' when none is close."""
    candidates = list(candidates)
    close = [c for c in candidates if _words(c) == _words(word)]  # train.lr_min -> train.min_lr
    close = close or [c for c in candidates if sorted(c) == sorted(word)]  # swapped letters: gpsu -> gpus
    close = close or _best(word, candidates, n, cutoff=0.6)
    if not close:  # a wrong section with the right field: `steps` or `model.steps` -> train.steps
        tail = word.rsplit(".", 1)[-1]
        by_tail = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [by_tail[t] for t in _best(tail, list(by_tail), n, cutoff=0.75)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def check_choice(key: str, value: object, choices: Iterable[str]) -> None:
    """ValueError `KEY='v' is not one of a | b (did you mean a?)` unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {' | '.join(choices)}"
                         f"{did_you_mean(str(value), choices)}")


def _words(key: str) -> tuple[str, list[str]]:
    section, _, name = key.rpartition(".")
    return section, sorted(name.split("_"))


def _best(word: str, candidates: list[str], n: int, cutoff: float) -> list[str]:
    """The candidates most similar to `word`: the best one and any as good (at most n)."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    scored = [(r, c) for r, c in scored if r >= cutoff]
    return [c for r, c in scored[:n] if r >= scored[0][0] - 0.02] if scored else []
