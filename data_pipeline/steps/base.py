"""A step looks at one document and keeps it (possibly rewriting its text) or removes it with a reason."""

from __future__ import annotations

from typing import Any, ClassVar

from megaqwen.data_pipeline.config_util import from_dict
from megaqwen.data_pipeline.document import Document, StepStats

STEP_TYPES: dict[str, type[Step]] = {}


class Step:
    """Subclasses set `name` and `Config` and implement `process`; `__call__` keeps the counts."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, cfg: Any = None):
        self.cfg = cfg if cfg is not None else self.Config()
        self.stats = StepStats(self.name)
        self.last_reason = ""

    def all_stats(self) -> list[StepStats]:
        """The stats to report for this step (a router reports its sub-steps')."""
        return [self.stats]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            STEP_TYPES[cls.name] = cls

    def process(self, doc: Document) -> str | None:
        """Inspect (and maybe rewrite) `doc`; return a removal reason, or None to keep it."""
        raise NotImplementedError

    def __call__(self, doc: Document) -> Document | None:
        self.stats.seen += 1
        before = doc.text
        reason = self.process(doc)
        if reason is not None:
            self.last_reason = f"{self.stats.name}:{reason}"
            self.stats.remove(self.last_reason)
            return None
        self.stats.kept += 1
        if doc.text is not before and doc.text != before:
            self.stats.modified += 1
        return doc


def step_types() -> dict[str, type[Step]]:
    """Every step by name (importing the step modules registers their steps)."""
    from megaqwen.data_pipeline.steps import (  # noqa: F401
        code_filters,
        content,
        filters,
        html,
        junk,
        langid,
        math_filters,
        normalize,
        pii,
        route,
    )

    return STEP_TYPES


def build_steps(specs: list[dict[str, Any]]) -> list[Step]:
    """Steps from config entries such as `{"name": "gopher_quality", "min_doc_words": 50}`."""
    step_types()
    steps = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"steps[{i}]: each step needs a 'name' key, got {spec!r}")
        params = {k: v for k, v in spec.items() if k != "name"}
        cls = STEP_TYPES.get(spec["name"])
        if cls is None:
            raise ValueError(f"steps[{i}]: unknown step {spec['name']!r}; known: {sorted(STEP_TYPES)}")
        steps.append(cls(from_dict(cls.Config, params, f"steps[{i}] ({spec['name']})")))
    return steps
