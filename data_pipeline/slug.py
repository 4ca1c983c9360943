"""File names for domains: `social media` -> `social-media`, so no output path holds a space.

Domain names are what people read (recipes' plans, reports, document metadata keep them); the files
and folders made per domain (`annotated/<slug>/`, `shards/<slug>.bin/.idx`) use the slug.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def slug(name: str) -> str:
    """Lower case, runs of anything outside [a-z0-9_-] as one `-`, no leading/trailing `-`."""
    s = _UNSAFE.sub("-", name.lower()).strip("-")
    return s or "domain"


def domain_slugs(names: Iterable[str]) -> dict[str, str]:
    """`{name: slug}`, distinct: names whose slugs collide get `-2`, `-3`, ... in sorted name order
    (`Social Media` and `social media` -> `social-media` and `social-media-2`)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in sorted(set(names)):
        base = s = slug(name)
        k = 2
        while s in used:
            s, k = f"{base}-{k}", k + 1
        out[name] = s
        used.add(s)
    return out
