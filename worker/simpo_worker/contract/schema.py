"""Typed records from plain YAML/JSON data, and the OpenAPI schema of the same types.

Every rule about a field is written once, on the dataclass, and read from there by both sides:
- `setting(doc, default, minimum=..., pattern=..., ...)` documents a field and bounds it;
- a class's `RULES` hold cross-field rules, each a CEL expression for the API server and the same check in Python,
  with one message.
`from_data` parses and enforces them, raising ConfigError naming the key path; `openapi_schema` writes them into
the CRD (description, default, minimum/maximum, enum, pattern, x-kubernetes-validations), so `kubectl apply`
refuses what the worker would refuse, and `kubectl explain` reads like documentation.

Standard library only: the operator validates with it and never imports JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from simpo_worker.contract.errors import ConfigError

# Bounds keep the API server's cost estimate of CEL rules small.
MAX_STRING_LENGTH = 4096
MAX_LIST_ITEMS = 1024


@dataclass(frozen=True)
class Rule:
    """A rule over an object (or, on a field, over its value): `cel` for the CRD, `check` for Python.

    `message` is static (the API server's cost estimate refuses string-building message expressions); Python
    errors add the values of the fields named in `shows`. `field` names the key the message is about (the error
    path ends there), empty for the object itself."""

    cel: str
    # None: a transition rule (over oldSelf) that only the API server can check.
    check: Optional[Callable[[Any], bool]]
    message: str
    field: str = ""
    shows: tuple[str, ...] = ()

    def python_message(self, obj: Any) -> str:
        if not self.shows:
            return self.message
        return f"{self.message} ({', '.join(f'{name} = {_get(obj, name)}' for name in self.shows)})"


def setting(doc: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            minimum: Optional[float] = None, maximum: Optional[float] = None, exclusive_minimum: bool = False,
            exclusive_maximum: bool = False, min_items: Optional[int] = None, max_items: Optional[int] = None,
            unique_items: bool = False, item_minimum: Optional[float] = None, min_length: Optional[int] = None,
            max_length: Optional[int] = None, pattern: Optional[str] = None, pattern_message: str = "",
            rules: tuple[Rule, ...] = (), immutable: bool = False) -> Any:
    """A documented, bounded dataclass field (see the module docstring)."""
    metadata = {"doc": " ".join(doc.split()), "minimum": minimum, "maximum": maximum,
                "exclusive_minimum": exclusive_minimum, "exclusive_maximum": exclusive_maximum,
                "min_items": min_items, "max_items": max_items, "unique_items": unique_items,
                "item_minimum": item_minimum, "min_length": min_length, "max_length": max_length,
                "pattern": pattern, "pattern_message": pattern_message, "rules": rules, "immutable": immutable}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"setting": metadata})


def _meta(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get("setting", {})


# A class's type hints and fields, once: get_type_hints evaluates every annotation on each call, most of the
# operator's validation of a job (1.27 -> 0.15 ms; bench/README.md, operator_load.py).
_hints = functools.cache(typing.get_type_hints)
_fields = functools.cache(dataclasses.fields)


def _rules(cls: type) -> tuple[Rule, ...]:
    return cls.__dict__.get("RULES", ())


# ---- parsing -------------------------------------------------------------------------------------------------


def from_data(cls: type, data: Any, path: str, check_rules: bool = True) -> Any:
    """Parse plain YAML/JSON data into dataclass `cls`: keys, types, bounds and rules, recursively (`check_rules`
    False: all but the `RULES` of `cls` itself, for a test of those rules)."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_type_name(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in _fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{join(path, str(unknown[0]))}: unknown key (allowed: {', '.join(sorted(fields))})")
    values = {}
    for name, f in fields.items():
        key_path = join(path, name)
        if name in data:
            values[name] = _coerce(hints[name], data[name], key_path)
            _check_setting(_meta(f), values[name], key_path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_path}: required key is missing")
    obj = cls(**values)
    if check_rules:
        _check_rules(obj, path)
    return obj


def validate(obj: Any, path: str = "") -> None:
    """Check an object built in Python (e.g. from a checkpoint's config.json) as from_data checks parsed data."""
    for f in _fields(type(obj)):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, join(path, f.name))
        _check_setting(_meta(f), value, join(path, f.name))
    _check_rules(obj, path)


def _check_rules(obj: Any, path: str) -> None:
    for rule in _rules(type(obj)):
        if rule.check is not None and not rule.check(obj):
            raise ConfigError(f"{join(path, rule.field) or path or 'config'}: {rule.python_message(obj)}")


def _check_setting(meta: dict[str, Any], value: Any, path: str) -> None:
    if not meta or value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(meta, value, path)
    if isinstance(value, str):
        if meta["min_length"] is not None and len(value.strip()) < meta["min_length"]:
            raise ConfigError(f"{path}: must not be empty")
        if meta["pattern"] is not None and not re.search(meta["pattern"], value):
            raise ConfigError(f"{path}: {meta['pattern_message'] or 'must match ' + meta['pattern']}, got {value!r}")
    if isinstance(value, list):
        if meta["min_items"] is not None and len(value) < meta["min_items"]:
            raise ConfigError(f"{path}: needs at least {meta['min_items']} item(s), got {len(value)}")
        if meta["max_items"] is not None and len(value) > meta["max_items"]:
            raise ConfigError(f"{path}: at most {meta['max_items']} items, got {len(value)}")
        if meta["unique_items"] and len(set(value)) != len(value):
            raise ConfigError(f"{path}: items must be unique, got {value}")
        if meta["item_minimum"] is not None and any(item < meta["item_minimum"] for item in value):
            raise ConfigError(f"{path}: items must be >= {meta['item_minimum']}, got {value}")
    for rule in meta["rules"]:
        if not rule.check(value):
            raise ConfigError(f"{path}: {rule.message}, got {value!r}")


def _check_number(meta: dict[str, Any], value: float, path: str) -> None:
    low, high = meta["minimum"], meta["maximum"]
    low_ok = low is None or (value > low if meta["exclusive_minimum"] else value >= low)
    high_ok = high is None or (value < high if meta["exclusive_maximum"] else value <= high)
    if low_ok and high_ok:
        return
    if low is not None and high is not None:
        interval = (f"{'(' if meta['exclusive_minimum'] else '['}{_num(low)}, "
                    f"{_num(high)}{')' if meta['exclusive_maximum'] else ']'}")
        raise ConfigError(f"{path}: must be in {interval}, got {value}")
    if low is not None:
        raise ConfigError(f"{path}: must be {'>' if meta['exclusive_minimum'] else '>='} {_num(low)}, got {value}")
    raise ConfigError(f"{path}: must be {'<' if meta['exclusive_maximum'] else '<='} {_num(high)}, got {value}")


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if value is None:
        raise ConfigError(f"{path}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_type_name(value)}")
        return [_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ConfigError(f"{path}: expected a mapping with string keys, got {_type_name(value)}")
        if args[1] is Any:  # a free-form object (a Kubernetes API type the API server validates)
            return value
        return {key: _coerce(args[1], item, f"{path}.{key}") for key, item in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_data(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_type_name(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_type_name(value)} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_type_name(value)} {value!r}")
        return value
    raise TypeError(f"config type {hint!r} at {path} is not supported by the parser")


def to_data(obj: Any) -> Any:
    """The inverse of from_data: plain dicts/lists without None values, for YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_data(getattr(obj, f.name)) for f in _fields(type(obj))
                if getattr(obj, f.name) is not None}
    if isinstance(obj, list):
        return [to_data(item) for item in obj]
    return obj


def replace(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace for nested fields: replace(cfg, **{"trainer.num_train_steps": 3})."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, inner in nested.items():
        direct[head] = replace(getattr(obj, head), **inner)
    return dataclasses.replace(obj, **direct)


# ---- the OpenAPI schema of the same types ----------------------------------------------------------------------


def openapi_schema(hint: Any, path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Structural OpenAPI v3 schema for a type hint: types, required keys, docs, defaults, bounds and rules.

    Optional fields are not `nullable`: the API server prunes an explicit null, so the field reads as unset (as
    `has()` in CEL and None in Python)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return openapi_schema(inner, path)
    if origin is Literal:
        return {"type": "string", "enum": list(args)}
    if origin is list:
        return {"type": "array", "maxItems": MAX_LIST_ITEMS, "items": openapi_schema(args[0], path)}
    if origin is dict:
        if args[1] is Any:
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return {"type": "object", "maxProperties": MAX_LIST_ITEMS, "additionalProperties": openapi_schema(args[1], path)}
    if dataclasses.is_dataclass(hint):
        return _object_schema(hint, path)
    simple = {bool: {"type": "boolean"}, int: {"type": "integer", "format": "int64"}, float: {"type": "number"},
              str: {"type": "string", "maxLength": MAX_STRING_LENGTH}}
    if hint in simple:
        return dict(simple[hint])
    raise TypeError(f"no schema for {hint!r} at {'.'.join(path)}")


def _object_schema(cls: type, path: tuple[str, ...]) -> dict[str, Any]:
    hints = _hints(cls)
    fields = _fields(cls)
    schema: dict[str, Any] = {"type": "object"}
    doc = cls.__dict__.get("__doc__")
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclass's generated signature is no description
        schema["description"] = " ".join(doc.split())
    schema["properties"] = {f.name: _field_schema(f, hints[f.name], path + (f.name,)) for f in fields}
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        schema["required"] = required
    rules = [{"rule": rule.cel, "message": rule.message, **({"fieldPath": f".{rule.field}"} if rule.field else {})}
             for rule in _rules(cls)]
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def _field_schema(f: dataclasses.Field, hint: Any, path: tuple[str, ...]) -> dict[str, Any]:
    schema = openapi_schema(hint, path)
    meta = _meta(f)
    if not meta:
        return schema
    described = {"description": meta["doc"]} if meta["doc"] else {}
    schema = {**described, **schema} if "description" not in schema else {
        **schema, "description": f"{meta['doc']} {schema['description']}".strip()}
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    # Scalar defaults only: an object default would be filled in whole by the API server.
    if default is not None and not dataclasses.is_dataclass(default) and default not in ([], {}):
        schema["default"] = default
    for key, name in (("minimum", "minimum"), ("maximum", "maximum"), ("min_items", "minItems"),
                      ("max_items", "maxItems"), ("min_length", "minLength"), ("max_length", "maxLength"),
                      ("pattern", "pattern")):
        if meta[key] is not None:
            schema[name] = meta[key]
    if meta["exclusive_minimum"]:
        schema["exclusiveMinimum"] = True
    if meta["exclusive_maximum"]:
        schema["exclusiveMaximum"] = True
    if meta["unique_items"]:
        schema["x-kubernetes-list-type"] = "set"
    if meta["item_minimum"] is not None:
        schema["items"] = {**schema["items"], "minimum": meta["item_minimum"]}
    rules = [{"rule": rule.cel, "message": rule.message} for rule in _field_rules(meta, path)]
    if rules:
        schema["x-kubernetes-validations"] = schema.get("x-kubernetes-validations", []) + rules
    return schema


def _field_rules(meta: dict[str, Any], path: tuple[str, ...]) -> tuple[Rule, ...]:
    """A field's rules as the CRD carries them: its own, then `self == oldSelf` if it is immutable (a transition
    rule: only the API server checks it)."""
    if not meta["immutable"]:
        return meta["rules"]
    return (*meta["rules"], Rule("self == oldSelf", None, f"{'.'.join(path)} is immutable"))


@dataclass(frozen=True)
class RuleSite:
    """A rule where the CRD carries it: `location` is the schema path of its object or field (`[]`: a list's
    items), `hint` the type of the value there (CEL's `self`)."""

    location: str
    hint: Any
    rule: Rule

    def parse(self, data: Any) -> Any:
        """`data` as the rule's Python check sees it: parsed as `hint`, every other rule checked, this one not."""
        if dataclasses.is_dataclass(self.hint):
            return from_data(self.hint, data, self.location, check_rules=False)
        return _coerce(self.hint, data, self.location)


def rule_sites(hint: Any, path: tuple[str, ...] = (), location: str = "") -> list[RuleSite]:
    """Every rule that `openapi_schema(hint, path)` writes into the schema, with where it sits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return rule_sites(inner, path, location)
    if origin is list:
        return rule_sites(args[0], path, f"{location}[]")
    if origin is dict and args[1] is not Any:
        return rule_sites(args[1], path, f"{location}{{}}")
    if not dataclasses.is_dataclass(hint):
        return []
    sites = [RuleSite(location, hint, rule) for rule in _rules(hint)]
    hints = _hints(hint)
    for f in _fields(hint):
        field_location = join(location, f.name)
        sites += rule_sites(hints[f.name], path + (f.name,), field_location)
        if _meta(f):
            rules = _field_rules(_meta(f), path + (f.name,))
            sites += [RuleSite(field_location, hints[f.name], rule) for rule in rules]
    return sites


# ---- small helpers ----------------------------------------------------------------------------------------------


def join(path: str, key: str) -> str:
    if not key:
        return path
    return f"{path}.{key}" if path else key


def _get(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
