"""`megaqwen-train --help`: every config field with its default and its one-line doc, by section.

The docs are the attribute docstrings of the config dataclasses (the string under each field), read
from their source with `ast`, so the help cannot drift from the schema. Values are those of the
config composed with the command line's overrides (conf/config.yaml: the schema plus the default
presets), so `megaqwen-train model=qwen2.5-7b --help model` shows the 7B's. `--help SECTION` shows
one section (and its presets); SECTION is a schema section (model, train, parallel, logger, ...).
"""

from __future__ import annotations

import ast
import inspect
import shutil
import sys
import textwrap
from typing import Any

from megaqwen.train.errors import UsageError, did_you_mean
from megaqwen.train.overrides import preset_groups, schema_fields, schema_sections

USAGE = """\
usage: megaqwen-train [--help [SECTION]] [--version] [--debug] [--check] [GROUP=PRESET ...]
                      [KEY=VALUE ...]

Train (or resume) a Qwen2.5-family model. Every field below is a command-line override; a preset
group sets many fields at once, and later overrides win:
  megaqwen-train model=qwen2.5-0.5b data.path=shards/web train.steps=1000 train.lr=3e-4
  megaqwen-train train.allow_changes=[train.seq_len,model.rope_theta,data.path] train.seq_len=32768 ...
Several processes: launch/torchrun.sh --nproc-per-node N [overrides].

options:
  --help, -h    show this text and exit; --help SECTION shows one section and its presets
                ({sections});
                overrides set the values shown: megaqwen-train model=qwen2.5-7b --help model
  --version     print megaqwen's version and exit
  --debug       show full tracebacks of configuration errors (same as MEGAQWEN_DEBUG=1)
  --check       check overrides, data, layout and run folder without training (exit status 2 on a
                problem); launch/torchrun.sh runs this once before starting any rank
  --cfg job     print the composed config as YAML and exit (Hydra; --hydra-help lists Hydra's flags)
"""


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring, whitespace collapsed to one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _section_title(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclass puts there when there is none
        doc = sys.modules[cls.__module__].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _default(cfg: Any, key: str) -> str:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    if node is None:
        return "null"
    if isinstance(node, bool):
        return str(node).lower()
    if isinstance(node, list):
        return "[" + ",".join(map(str, node)) + "]"
    return str(node)


def help_sections() -> list[str]:
    """What `--help SECTION` accepts: the schema's top-level sections (a section includes its
    subsections: `logger` shows logger.wandb too)."""
    return [name for name, _ in schema_sections() if "." not in name]


def help_text(cfg: Any, width: int | None = None, section: str | None = None,
              overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The help with the values of the composed config `cfg` (`overrides`: what it was composed
    with, named in the header); `section` limits it to one section and its presets."""
    width = width or min(shutil.get_terminal_size((110, 24)).columns, 110)
    sections = help_sections()
    if section is not None and section not in sections:
        raise UsageError(f"--help {section}: no such section{did_you_mean(section, sections)}; "
                         f"sections: {', '.join(sections)}")
    lines = [] if section else [USAGE.format(sections=", ".join(sections)), "presets (GROUP=PRESET):"]
    if overrides:
        lines[:0] = [textwrap.fill("values with the overrides " + " ".join(overrides), width=width), ""]
    for group, names in sorted(preset_groups().items()):
        if section in (None, group):
            lines.append(textwrap.fill(", ".join(names) + f"   (conf/{group}/*.yaml)", width=width,
                                       initial_indent=f"  {group:<10} ", subsequent_indent=" " * 13))
    lines += _fields(cfg, width, section)
    if section is None:
        lines += ["", "A mistake in any of these stops the run before a model is built, as one message;",
                  "MEGAQWEN_DEBUG=1 (or --debug) adds the traceback."]
    return "\n".join(lines).lstrip("\n") + "\n"


def _fields(cfg: Any, width: int, section: str | None) -> list[str]:
    """Every field of the section (all sections when None): `key=value` and its doc."""
    by_section: dict[str, list[tuple[str, str]]] = {}
    docs_cache: dict[type, dict[str, str]] = {}
    for key, owner, f in schema_fields():
        docs = docs_cache.setdefault(owner, field_docs(owner))
        by_section.setdefault(key.rsplit(".", 1)[0], []).append((key, docs.get(f.name, "")))
    key_w, lines = 36, []
    for name, cls in schema_sections():
        if name not in by_section or (section is not None and name.split(".")[0] != section):
            continue
        lines += ["", textwrap.fill(f"{name}: {_section_title(cls)}", width=width, subsequent_indent="  ")]
        for key, doc in by_section[name]:
            head = f"  {key}={_default(cfg, key)}"
            if len(head) > key_w:  # a long value: the doc goes under it
                lines.append(head)
                head = ""
            lines.append(textwrap.fill(doc, width=width, initial_indent=f"{head:<{key_w}}  ",
                                       subsequent_indent=" " * (key_w + 2), break_on_hyphens=False,
                                       break_long_words=False))
    return lines
