"""Route each document to the filter set made for its content type (prose / code / math).

    - name: route
      prose: [{name: langid, languages: [en, de, zh]}, {name: gopher_repetition}, {name: gopher_quality}]
      code:  [{name: code_quality}]
      math:  [{name: langid, languages: [en, de, zh], min_score: 0.5}, {name: math_quality}]

The content type comes from the `content_type` step (run before `normalize`, so that code keeps its
whitespace), or is classified here when that step did not run. Sub-steps keep their own counts,
reported as `<type>/<step>` (e.g. `code/code_quality`), and their removal reasons carry that name
(`prose/gopher_quality:stop_words`). The router's own row holds the same reasons summed (so the
top-level rows chain: what one keeps the next sees) and counts documents per content type under
`changes`; reports sum reasons over top-level rows only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megaqwen.data_pipeline.document import Document, StepStats
from megaqwen.data_pipeline.steps.base import Step, build_steps
from megaqwen.data_pipeline.steps.content import CONTENT_TYPES, content_type


@dataclass
class RouteConfig:
    prose: list[dict[str, Any]] = field(default_factory=list)
    """steps for prose, in order (e.g. langid, Gopher, C4, FineWeb)."""
    code: list[dict[str, Any]] = field(default_factory=list)
    """steps for source code and code tutorials (e.g. code_quality)."""
    math: list[dict[str, Any]] = field(default_factory=list)
    """steps for LaTeX and text with equations (e.g. math_quality)."""


class Route(Step):
    name = "route"
    Config = RouteConfig

    def __init__(self, cfg: RouteConfig | None = None):
        super().__init__(cfg)
        self.routes: dict[str, list[Step]] = {}
        for ct in CONTENT_TYPES:
            steps = build_steps(getattr(self.cfg, ct))
            for s in steps:
                s.stats.name = f"{ct}/{s.name}"
            self.routes[ct] = steps

    def all_stats(self) -> list[StepStats]:
        return [self.stats] + [s.stats for steps in self.routes.values() for s in steps]

    def __call__(self, doc: Document) -> Document | None:
        self.stats.seen += 1
        ct = content_type(doc)
        self.stats.changes[ct] += 1
        for step in self.routes[ct]:
            if step(doc) is None:
                self.last_reason = step.last_reason
                self.stats.remove(step.last_reason)  # (the sub-step's own row counts it too)
                return None
        self.stats.kept += 1
        return doc
