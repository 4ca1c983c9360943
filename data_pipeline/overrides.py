"""`key=value` overrides of a pipeline YAML, checked against the config dataclasses before any work.

Keys are dotted paths into the nested config. Entries of a list are named by their `name` (or by
position): the remix stages (`remix.stages.stage-4k.max_epochs=2`) and the per-document steps,
whose parameters are typed by the step's own config class
(`steps.route.prose.gopher_quality.min_doc_words=30`). Dict-valued fields take new keys
(`remix.stages.stage-4k.factors.code=2`). Values are YAML scalars (`1e6`, `null`, `true`, `[a, b]`)
and must fit the field's type (an integer field takes `1e6`, not `1.5`). An unknown key is refused
with the closest valid spellings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

from megaqwen.suggest import did_you_mean

EXAMPLE = "remix.stages.stage-4k.max_epochs=2"
_STEP_LIST = list[dict[str, Any]]  # how the configs type a list of per-document steps


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], schema: type) -> dict[str, Any]:
    """`data` (a YAML mapping for `schema`) with each `key=value` set in place; returns `data`."""
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. {EXAMPLE})")
        value = yaml.safe_load(raw) if raw.strip() else None
        try:
            _set(schema, data, key.split("."), value, raw)
        except _Unknown:
            hint = _suggest(key, schema, data)
            raise ValueError(f"override {text!r}: unknown config key {key!r}{hint}") from None
        except ValueError as e:
            raise ValueError(f"override {text!r}: {e}") from None
    return data


class _Unknown(Exception):
    pass


def _suggest(key: str, schema: type, data: dict[str, Any]) -> str:
    """` (did you mean ...?)`: keys ending in the same field (`max_epochs` -> each remix stage's),
    else the closest spellings."""
    known = sorted(_keys(schema, data, ""))
    tail = key.rsplit(".", 1)[-1]
    same = [k for k in known if k.rsplit(".", 1)[-1] == tail and k != key]
    return f" (did you mean {' or '.join(same[:4])}?)" if same else did_you_mean(key, known)


def _is_step_list(tp: Any) -> bool:
    return tp == _STEP_LIST


def _named_list_item(tp: Any) -> type | None:
    """The entry type of a list of named dataclasses (`list[StageMix]`), else None."""
    if typing.get_origin(tp) is list:
        (arg,) = typing.get_args(tp) or (None,)
        if dataclasses.is_dataclass(arg) and "name" in {f.name for f in dataclasses.fields(arg)}:
            return arg
    return None


def _step_config(name: Any) -> type:
    from megaqwen.data_pipeline.steps.base import step_types

    types_ = step_types()
    if name not in types_:
        raise ValueError(f"unknown step {name!r}; known: {sorted(types_)}")
    return types_[name].Config


def _default_raw(tp: type, name: str) -> Any:
    """The YAML form of a field's default (a list of stages when the YAML names none, ...)."""
    f = next(f for f in dataclasses.fields(tp) if f.name == name)
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _entry(items: list[Any], label: str) -> int:
    """Index of the list entry called `label` (its `name`, or its position)."""
    names = [it.get("name") if isinstance(it, dict) else None for it in items]
    hits = [i for i, n in enumerate(names) if n == label]
    if len(hits) > 1:
        raise ValueError(f"{len(hits)} entries are named {label!r}: give the position ({hits}) instead")
    if hits:
        return hits[0]
    if label.isdigit() and int(label) < len(items):
        return int(label)
    raise _Unknown


def _set(tp: Any, node: Any, parts: list[str], value: Any, raw: str) -> None:
    """Set `value` at `parts` below `node` (YAML data shaped by type `tp`)."""
    head, rest = parts[0], parts[1:]
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        if head not in hints or not isinstance(node, dict):
            raise _Unknown
        if not rest:
            node[head] = _checked(hints[head], value, raw)
            return
        if head not in node or node[head] is None:
            node[head] = _default_raw(tp, head)
        _set(hints[head], node[head], rest, value, raw)
    elif _is_step_list(tp) or _named_list_item(tp) is not None:
        if not isinstance(node, list) or not rest:
            raise _Unknown
        item = node[_entry(node, head)]
        item_tp = _named_list_item(tp) or _step_config(item.get("name"))
        _set(item_tp, item, rest, value, raw)
    elif typing.get_origin(tp) is dict:
        _, val_tp = typing.get_args(tp)
        if not rest:
            node[head] = _checked(val_tp, value, raw)
            return
        node.setdefault(head, {})
        _set(val_tp, node[head], rest, value, raw)
    elif tp is Any and isinstance(node, dict):
        if rest:
            _set(Any, node.setdefault(head, {}), rest, value, raw)
        else:
            node[head] = value
    else:
        raise _Unknown


def _keys(tp: Any, node: Any, prefix: str) -> Iterator[str]:
    """Every key an override may name below `prefix` (for "did you mean")."""
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    if dataclasses.is_dataclass(tp):
        node = node if isinstance(node, dict) else {}
        for name, sub in typing.get_type_hints(tp).items():
            yield join(name)
            child = node.get(name) if name in node else _default_raw(tp, name)
            yield from _keys(sub, child, join(name))
    elif (_is_step_list(tp) or _named_list_item(tp) is not None) and isinstance(node, list):
        names = [it.get("name") if isinstance(it, dict) else None for it in node]
        for i, item in enumerate(node):
            label = names[i] if names.count(names[i]) == 1 else str(i)
            try:
                item_tp = _named_list_item(tp) or _step_config(item.get("name"))
            except ValueError:
                continue
            yield from _keys(item_tp, item, join(label))
    elif typing.get_origin(tp) is dict and isinstance(node, dict):
        yield from (join(k) for k in node)


def _type_name(tp: Any) -> str:
    plain = isinstance(tp, type) and typing.get_origin(tp) is None
    return tp.__name__ if plain else str(tp).replace("typing.", "")


def _checked(tp: Any, value: Any, raw: str) -> Any:
    """`value` as the field type `tp` wants it, or ValueError naming both."""
    ok, out = _fit(tp, value, raw)
    if not ok:
        raise ValueError(f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return out


def _fit(tp: Any, value: Any, raw: str) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _fit(arg, value, raw)
            if ok:
                return True, out
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp in (int, float):
        num = value
        if isinstance(value, str):  # YAML 1.1 reads `1e6` as a string
            try:
                num = float(value)
            except ValueError:
                return False, value
        if isinstance(num, bool) or not isinstance(num, (int, float)):
            return False, value
        if tp is int:
            return (float(num).is_integer(), int(num)) if isinstance(num, float) else (True, num)
        return True, float(num)
    if tp is str:
        if isinstance(value, str):
            return True, value
        # `name=123` or `model=1.5`: the text as written, not YAML's number
        return (not isinstance(value, (list, dict)) and value is not None), raw.strip()
    if origin is list:
        if value is None or isinstance(value, dict):
            return False, value
        if not isinstance(value, list):  # `input.paths=data/*.jsonl`: a list of one
            value = [value]
        (arg,) = typing.get_args(tp) or (Any,)
        fitted = [_fit(arg, v, str(v)) for v in value]
        return all(ok for ok, _ in fitted), [v for _, v in fitted]
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        _, arg = typing.get_args(tp)
        fitted = {k: _fit(arg, v, str(v)) for k, v in value.items()}
        return all(ok for ok, _ in fitted.values()), {k: v for k, (_, v) in fitted.items()}
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict), value
    return isinstance(value, tp) if isinstance(tp, type) else True, value
