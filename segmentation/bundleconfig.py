"""A MONAI bundle's configuration read as data: references followed, expressions recognised, never run.

A bundle's JSON/YAML is a program (``$`` expressions are Python, ``@`` refers
to other entries, ``_target_`` names a class).  These helpers read it the way
a careful person would: literal values as they are, pure references looked up,
anything else reported as an expression, which only a trusted bundle
(``--trust-bundle``) may have MONAI evaluate.  :mod:`segmentation.bundle` and
:mod:`segmentation.bundletransforms` share them.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any

from storage import jsontext
from storage.errors import ModelError

TRUST_HINT = "pass --trust-bundle (trust_bundle=True) to let MONAI evaluate the bundle's configuration"


def read_config(path: Path) -> Any:
    """JSON or YAML as plain data (``yaml.safe_load``: no tags, no objects)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(path, f"unreadable bundle configuration ({exc})") from None
    try:
        if path.suffix == ".json":
            doc = jsontext.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - json.JSONDecodeError or yaml.YAMLError
        raise ModelError(path, f"invalid bundle configuration ({' '.join(str(exc).split())[:200]})") from None
    if _expands_past(doc, MAX_CONFIG_VALUES):
        raise ModelError(path, f"the bundle configuration expands to more than {MAX_CONFIG_VALUES:,} values (YAML "
                               "aliases of aliases?); refused rather than walked")
    return doc


MAX_CONFIG_VALUES = 1_000_000  # values a configuration may hold once its YAML aliases are expanded


def _expands_past(doc: Any, limit: int) -> bool:
    """Whether walking ``doc`` as a tree visits more than ``limit`` values.  YAML aliases share one object under
    many keys, so ten levels of nine aliases are 9**10 values to a walker: ``model inspect`` ran for minutes on
    one ("billion laughs").  The count stops at the limit, so this check is bounded too."""
    seen, stack = 0, [doc]
    while stack:
        value = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def short_name(target: Any) -> str:
    """``monai.transforms.ScaleIntensityRanged`` -> ``ScaleIntensityRanged``."""
    return str(target).rsplit(".", 1)[-1]


def base_name(name: str) -> str:
    """Dictionary transforms end in ``d``; ``ScaleIntensityRanged`` and ``ScaleIntensityRange`` are one."""
    return name[:-1] if name.endswith("d") and len(name) > 1 else name


def is_expression(value: Any) -> bool:
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


REFERENCE = re.compile(r"^\$?@([A-Za-z0-9_]+(?:(?:::|#)[A-Za-z0-9_]+)*)$")


def lookup(config: Any, ref: str) -> Any:
    node = config
    for part in re.split(r"::|#", ref):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def deref(config: dict, value: Any, depth: int = 0) -> tuple[Any, bool]:
    """Follow a pure reference (``@id`` or ``$@id``) by looking it up: reading, not evaluating.

    Returns (value, resolved); a value that is any other expression is returned as is.
    """
    while isinstance(value, str) and depth < 8:
        m = REFERENCE.match(value)
        if not m:
            break
        target = lookup(config, m.group(1))
        if target is None:
            break
        value, depth = target, depth + 1
    return value, not is_expression(value)


def first_expression(value: Any) -> str | None:
    """The first non-literal part of a network argument (expression, reference, macro, object)."""
    if is_expression(value):
        return repr(value)
    if isinstance(value, dict):
        if "_target_" in value:
            return f"an object {{'_target_': {value['_target_']!r}}}"
        for v in value.values():
            if (found := first_expression(v)) is not None:
                return found
    if isinstance(value, list):
        for v in value:
            if (found := first_expression(v)) is not None:
                return found
    return None


def jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(type(value).__name__)


def transform_keys(transform: dict) -> list[str] | None:
    keys = transform.get("keys")
    if isinstance(keys, str) and not is_expression(keys):
        return [keys]
    if isinstance(keys, list) and all(isinstance(k, str) and not is_expression(k) for k in keys):
        return keys
    return None  # not literal: assume it touches the image


class Args:
    """A transform's arguments: literals as they are, expressions only when trusted."""

    def __init__(self, transform: dict, tid: str | None, evaluate: Any) -> None:
        self.t, self.tid, self.evaluate = transform, tid, evaluate

    def get(self, name: str, default: Any = None) -> Any:
        value = self.t.get(name, default)
        if first_expression(value) is None:
            return value
        if self.evaluate is None or self.tid is None:
            raise ModelError(None, f"{short_name(self.t.get('_target_'))} argument {name!r} is an expression "
                                   f"({value!r}); {TRUST_HINT}")
        try:
            return jsonable_or_value(self.evaluate(f"{self.tid}::{name}"))
        except Exception as exc:  # noqa: BLE001 - evaluating foreign configuration can fail in any way
            raise ModelError(None, f"evaluating {self.tid}::{name} failed ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:160]})") from None


def jsonable_or_value(value: Any) -> Any:
    try:
        return jsonable(value.tolist() if hasattr(value, "tolist") else value)
    except TypeError:
        return value


def transform_list(config: dict, key: str) -> tuple[list[tuple[dict, str | None]], str | None]:
    """The literal list of transform dicts under ``config[key]``, each with its config id if known."""
    node, _ = deref(config, config.get(key))
    tid = key
    if isinstance(node, dict) and "transforms" in node:
        raw = node["transforms"]
        tid = f"{key}::transforms"
        m = REFERENCE.match(raw) if isinstance(raw, str) else None
        node, ok = deref(config, raw)
        if m:
            tid = m.group(1).replace("#", "::")
        if not ok:
            return [], f"{key} transforms are the expression {raw!r}"
    if node is None:
        return [], None
    if not isinstance(node, list):
        return [], f"{key} is not a literal list of transforms"
    out: list[tuple[dict, str | None]] = []
    for i, t in enumerate(node):
        t, ok = deref(config, t)
        if not ok or not isinstance(t, dict) or "_target_" not in t:
            return [], f"{key} transform {i} is {t!r}, not a literal transform"
        disabled = t.get("_disabled_", False)
        if isinstance(disabled, str) and disabled.strip().startswith(("$", "@", "%")):
            return [], f"{key} transform {i}'s _disabled_ is the expression {disabled!r}"
        if disabled.strip().lower() == "true" if isinstance(disabled, str) else bool(disabled):
            continue  # as MONAI's parser drops a disabled component from its list (it had been applied)
        out.append((t, f"{tid}::{i}"))
    return out, None


def as_floats(value: Any, n: int, what: str) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ModelError(None, f"{what} is {value!r}, not {n} numbers")
    return [float(v) for v in values]
