"""Command-line overrides checked against the schema, with "did you mean" for keys and values.

Hydra answers `train.stpes=5` with "To append to your config use +train.stpes=5", advice that is
wrong for a typed schema (no key can be added). Here every override is checked first: a key must be
a field of `Config` (or a preset group), a preset must exist in `conf/<group>/`, and a value of a
field with a fixed set of choices must be one of them; each miss names the closest valid spelling.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import typing
from collections.abc import Iterator

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from megaqwen.suggest import check_choice, did_you_mean
from megaqwen.train.config import Config
from megaqwen.train.errors import UsageError


def schema_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field]]:
    """(dotted key, owning dataclass, field) of every leaf field under `cls`, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_fields(hints[f.name], key + ".")
        else:
            yield key, cls, f


def schema_sections(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted name, dataclass) of every section: model, train, ..., logger.wandb."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield prefix + f.name, hints[f.name]
            yield from schema_sections(hints[f.name], f"{prefix}{f.name}.")


def preset_groups() -> dict[str, list[str]]:
    """Preset group -> preset names, from the YAML files shipped in megaqwen.conf."""
    root = importlib.resources.files("megaqwen.conf")
    return {d.name: sorted(f.name.removesuffix(".yaml") for f in d.iterdir() if f.name.endswith(".yaml"))
            for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))}


def value_choices() -> dict[str, tuple[str, ...]]:
    """kernels.* fields: one of a fixed set, each set taken from the kernel registry. The other
    fixed-choice fields are checked the same way (`megaqwen.suggest.check_choice`) where they are
    used: train.* and logger.* by `Config.validate`, parallel.* by `parallel.setup.validate_layout`."""
    from megaqwen.kernels.registry import IMPLS

    return {f"kernels.{op}": ("auto", *impls) for op, impls in IMPLS.items()}


def is_hydra_override(override: str) -> bool:
    """Overrides of Hydra's own settings (hydra.run.dir=..., hydra/job_logging=...)."""
    return re.match(r"^[+~]*hydra[./=]", override) is not None


def check_overrides(overrides: list[str]) -> None:
    """Every key a schema field or preset group, every preset one that exists; UsageError otherwise."""
    try:
        parsed = OverridesParser.create().parse_overrides(
            [o for o in overrides if not is_hydra_override(o)])
    except HydraException as e:
        raise UsageError(hydra_message(e)) from e
    keys = [k for k, _, _ in schema_fields()]
    sections = {name for name, _ in schema_sections()}
    groups = preset_groups()
    for o in parsed:
        key = o.key_or_group
        if o.type == OverrideType.DEL:
            continue
        if key in groups and o.type == OverrideType.CHANGE and isinstance(o.value(), str):
            if o.value() not in groups[key]:
                raise UsageError(f"{o.input_line}: no preset {o.value()!r} in conf/{key}/"
                                 f"{did_you_mean(o.value(), groups[key])}; presets: {', '.join(groups[key])}")
            continue
        if key in sections:
            raise UsageError(f"{o.input_line}: {key} is a section, set its fields ({key}.<field>=...); "
                             f"see megaqwen-train --help")
        if key not in keys:
            raise UsageError(f"{o.input_line}: unknown key {key!r}{did_you_mean(key, [*keys, *groups])}; "
                             "megaqwen-train --help lists every key")


def check_choices(cfg: Config) -> None:
    """Values of fixed-choice fields, with the closest valid value named."""
    for key, choices in value_choices().items():
        node: typing.Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        try:
            check_choice(key, node, choices)
        except ValueError as e:
            raise UsageError(str(e)) from None


_NOISE = ("To append to your config", "full_key:", "object_type=", "reference_type=",
          "See https://hydra.cc", "Set the environment variable HYDRA_FULL_ERROR")


def hydra_message(e: BaseException) -> str:
    """Hydra's / OmegaConf's message without its advice lines and object dumps, on one line."""
    parts = [str(e)]
    if isinstance(e.__cause__, OmegaConfBaseException | HydraException):
        parts.append(str(e.__cause__))
    lines = [ln.strip() for p in parts for ln in p.splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(_NOISE)]
    return "; ".join(dict.fromkeys(kept))  # unique, in order
