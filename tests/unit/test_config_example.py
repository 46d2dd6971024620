"""The configuration example shows the real defaults, except on the lines it marks.

The document says that the values shown for optional keys are the
defaults, except on lines whose comment starts with ``(example)``. This test
reads the example's ``toml`` block, loads it, and compares each key it sets
with the model's default for that field: a wrong default fails, and so does
a marked line whose value is the default after all (the mark is stale).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from lbgw.config import ROUTE_MATCHES, Config, RouteConfig, load_config
from lbgw.config.fields import spec_of

#: The document that holds the configuration example.
EXAMPLE_DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
#: A line whose comment starts with this shows a value that is not the default.
MARKER = "(example)"

Path_ = tuple[str | int, ...]


def example_text() -> str:
    """The first ```toml block with [[listeners]]: the configuration example."""
    text = EXAMPLE_DOC.read_text(encoding="utf-8")
    blocks: list[str] = [
        b for b in re.findall(r"```toml\n(.*?)```", text, re.DOTALL) if "[[listeners]]" in b
    ]
    assert blocks, f"{EXAMPLE_DOC}: no ```toml block with [[listeners]]"
    return blocks[0]


def shown_keys(text: str) -> list[tuple[Path_, bool]]:
    """The path of each key the example sets, and whether its line is marked ``(example)``.

    Continuation lines (indented), comments and commented-out keys show no
    value; an inline table shows each of its keys.
    """
    data = tomllib.loads(text)
    section: Path_ = ()
    counts: dict[str, int] = {}
    shown: list[tuple[Path_, bool]] = []
    for line in text.splitlines():
        if not line or line[0] in " #]":
            continue
        if line.startswith("[["):
            name = line[2 : line.index("]]")]
            counts[name] = counts.get(name, -1) + 1
            section = (name, counts[name])
        elif line.startswith("["):
            section = tuple(line[1 : line.index("]")].split("."))
        else:
            key = line[1 : line.index('"', 1)] if line[0] == '"' else line.split("=")[0].strip()
            comment = line.partition(" #")[2].strip()
            shown.extend(_expand((*section, key), data, comment.startswith(MARKER)))
    return shown


def _expand(path: Path_, data: Any, marked: bool) -> list[tuple[Path_, bool]]:
    value = data
    for part in path:
        value = value[part]
    if isinstance(value, dict):
        return [p for k in value for p in _expand((*path, k), data, marked)]
    return [(path, marked)]


def value_and_default(config: Config, path: Path_) -> tuple[Any, Any] | None:
    """The loaded value of the field at ``path`` and the model's default for it.

    ``None`` for a key without a default: a required one, such as an
    endpoint's address or a route's match and cluster.
    """
    obj: Any = config
    parts = list(path)
    while parts:
        part = parts.pop(0)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part in {spec_of(f).table for f in fields.values()}:  # [server]: Config's own fields
            continue
        if part not in fields:
            assert isinstance(obj, RouteConfig) and part in ROUTE_MATCHES, f"{path}: not a field"
            return None
        f, value = fields[part], getattr(obj, part)
        if parts and isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            at = parts.pop(0)  # an index, or a cluster's name
            obj = value[at] if isinstance(at, int) else next(v for v in value if v.name == at)
        elif parts and dataclasses.is_dataclass(value):
            obj = value
        else:  # a value, or a map whose entries the example shows
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                return None
            floor = spec_of(f).floor  # a default that rises to a sibling's value
            return value, max(default, getattr(obj, floor)) if floor else default
    raise AssertionError(f"{path}: a section, not a key")


def dotted(path: Path_) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def test_the_example_shows_the_keys_of_every_kind_of_section() -> None:
    shown = dict(shown_keys(example_text()))
    assert shown[("server", "grace_period")] is False
    assert shown[("clusters", "users", "health_check", "mode")] is False
    assert shown[("clusters", "orders", "params", "table_size")] is False
    assert shown[("clusters", "orders", "params", "hash_key")] is True
    assert shown[("routes", 0, "retry_on")] is False
    assert ("tracing", "exporter") not in shown  # commented out: no value shown


def test_every_unmarked_value_is_the_default_and_every_marked_one_is_not(tmp_path: Path) -> None:
    text = example_text()
    path = tmp_path / "lbgw.toml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    wrong, stale, compared = [], [], 0
    for key, marked in shown_keys(text):
        found = value_and_default(config, key)
        if found is None:
            continue
        value, default = found
        compared += 1
        if not marked and value != default:
            wrong.append(f"{dotted(key)}: shows {value!r}, the default is {default!r}")
        if marked and value == default:
            stale.append(f"{dotted(key)}: marked {MARKER}, but {value!r} is the default")
    assert not wrong, f"{EXAMPLE_DOC.name}: fix the value or mark it {MARKER}: {wrong}"
    assert not stale, f"{EXAMPLE_DOC.name}: {stale}"
    assert compared >= 50, f"only {compared} keys compared: is the example still parsed?"
