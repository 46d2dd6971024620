"""The one reader: it walks the model's dataclasses and checks a file's mapping against them.

For each field of a section the reader takes the field's type and ``Spec``
(``fields.py``) and reads the file's value, or takes the dataclass default
when the key is absent. Types it knows: ``bool``, ``int`` (a range),
``float`` (``>= 0`` or ``> 0``, a maximum), ``str`` and enums (choices),
``X | None``, a union of scalars, a nested section (a table, unknown keys
refused), a tuple of sections (an array of tables, or a table of tables
keyed by name), a tuple of ``(key, value)`` pairs (a table used as a map)
and a tuple of scalars (an array). Once a section is built, the cross-field
rules of ``rules.CHECKS`` run on it; ``rules.READERS`` reads the one field
whose file shape is not its type's (``routes``).

A bad value raises ``ConfigError`` with the source, the dotted key
(``clusters.api.endpoints[0].weight``) and what was expected.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from lbgw.config.fields import Invalid, Spec, spec_of
from lbgw.config.model import Config
from lbgw.config.rules import CHECKS, READERS
from lbgw.exceptions import ConfigError

__all__ = ["Reader", "config_from_bytes", "config_from_mapping", "load_config"]

T = TypeVar("T")

#: How an error names a scalar type in a union ("an integer or a string").
_NAMES: Final[Mapping[type, str]] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}
_PLAIN: Final = Spec()
#: A TOML bare key (TOML 1.0, "Keys"): shown as it is in an error; any other is quoted.
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(source, "(file)", f"a readable TOML file ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "(file)", f"UTF-8 text, as TOML requires ({exc})") from exc
    return config_from_mapping(data, source)


def config_from_bytes(data: bytes, source: str) -> Config:
    """Validate a TOML file's bytes, read before (a reload's snapshot); errors name ``source``."""
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "(file)", f"UTF-8 text, as TOML requires ({exc})") from exc
    return config_from_mapping(parsed, source)


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a mapping shaped like the TOML file (as ``tomllib`` returns it)."""
    return Reader(source).section(Config, data, "", preset={"source": source})


def hints(cls: type) -> Mapping[str, Any]:
    """The resolved type of each field of a model class."""
    return _hints(cls)


_hints: Final = functools.cache(typing.get_type_hints)


def _is_section(hint: object) -> typing.TypeGuard[type[Any]]:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def join(key: str, name: str) -> str:
    """``key.name``; a name that is not a bare TOML key (empty, dotted, spaced) is quoted."""
    if not _BARE_KEY.fullmatch(name):
        name = repr(name)
    return f"{key}.{name}" if key else name


class Reader:
    """Reads sections of one source; every error it raises names that source."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: object = None) -> ConfigError:
        return ConfigError(self.source, key, expected, got)

    def table(
        self, value: object, key: str, allowed: Collection[str], stray: str = ""
    ) -> Mapping[str, Any]:
        """``value`` as a table of ``allowed`` keys; ``stray`` says what another key should be."""
        if not isinstance(value, Mapping):
            raise self.fail(key, "a table", value)
        for name in value:
            if name not in allowed:
                raise self.fail(
                    join(key, name), stray or f"one of the keys {', '.join(sorted(allowed))}"
                )
        return value

    def section(  # noqa: PLR0913 - the walk's options, keyword-only
        self,
        cls: type[T],
        value: object,
        key: str,
        *,
        allowed: Collection[str] | None = None,
        stray: str = "",
        preset: Mapping[str, Any] | None = None,
        base: T | None = None,
        key_of: Callable[[str], str] | None = None,
    ) -> T:
        """Read the dataclass ``cls`` from the table ``value`` at ``key``.

        ``preset`` fields are given, not read; absent keys take ``base``'s
        values if given, else the defaults; ``key_of(field)`` names a field in
        errors (default: ``key.field``).
        """
        preset = preset or {}
        name_key = key_of or functools.partial(join, key)
        fields = [f for f in dataclasses.fields(cls) if f.name not in preset]  # type: ignore[arg-type]
        groups = sorted({spec_of(f).table for f in fields} - {""})
        if allowed is None:
            allowed = {f.name for f in fields if not spec_of(f).table} | set(groups)
        table = self.table(value, key, allowed, stray)
        where: dict[str, tuple[Mapping[str, Any], Callable[[str], str]]] = {"": (table, name_key)}
        for group in groups:  # fields kept in a table of their own, such as [server]
            names = {f.name for f in fields if spec_of(f).table == group}
            gkey = join(key, group)
            where[group] = (
                self.table(table.get(group, {}), gkey, names),
                functools.partial(join, gkey),
            )
        values: dict[str, Any] = dict(preset)
        for f in fields:
            s = spec_of(f)
            source, key_for = where[s.table]
            fkey = key_for(f.name)
            hook = READERS.get((cls, f.name))
            if hook is not None:
                values[f.name] = self.guard(fkey, hook, self, source.get(f.name), fkey, values)
            elif f.name in source:
                values[f.name] = self.value(hints(cls)[f.name], s, source[f.name], fkey, values)
            elif base is not None:
                values[f.name] = getattr(base, f.name)
            else:
                values[f.name] = self.default(f, s, fkey, values)
        built = cls(**values)
        for check in CHECKS.get(cls, ()):
            self.guard(key, check, built, table, name_key=name_key)
        return built

    def guard(
        self,
        key: str,
        rule: Callable[..., T],
        *args: Any,
        name_key: Callable[[str], str] | None = None,
    ) -> T:
        """``rule(*args)``, its ``Invalid`` turned into a ``ConfigError`` below ``key``.

        ``name_key`` names the first field of the refusal's path (``key.field``
        unless told otherwise).
        """
        try:
            return rule(*args)
        except Invalid as exc:
            head = re.split(r"[.\[]", exc.at, maxsplit=1)[0]
            where = (name_key or functools.partial(join, key))(head) if head else key
            raise self.fail(where + exc.at[len(head) :], exc.expected, exc.got) from None

    def default(
        self, f: dataclasses.Field[Any], s: Spec, key: str, siblings: Mapping[str, Any]
    ) -> Any:
        if f.default is not dataclasses.MISSING:
            value: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise self.fail(key, s.expected)
        return max(value, siblings[s.floor]) if s.floor else value

    def value(self, hint: Any, s: Spec, raw: object, key: str, siblings: Mapping[str, Any]) -> Any:
        """``raw``, the file's value for a field of type ``hint``, checked against ``s``."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            arms = [a for a in args if a is not types.NoneType]
            if len(arms) == 1:  # X | None: a value in the file is never None
                return self.value(arms[0], s, raw, key, siblings)
            if not any(type(raw) is arm for arm in arms):
                raise self.fail(key, " or ".join(_NAMES[a] for a in arms), raw)
            return raw
        if origin is tuple:
            return self.many(args[0], s, raw, key)
        if _is_section(hint):
            if not s.variant:
                return self.section(hint, raw, key)
            chosen = siblings[s.variant]
            takes = [f.name for f in dataclasses.fields(hint) if chosen in spec_of(f).variants]
            stray = s.stray(chosen, sorted(takes)) if s.stray else ""
            return self.section(hint, raw, key, allowed=takes, stray=stray)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return self.member(hint, s, raw, key)
        value = self.scalar(hint, s, raw, key, siblings)
        if s.check is not None:
            self.guard(key, s.check, value)
        return value

    def scalar(
        self, hint: type, s: Spec, raw: object, key: str, siblings: Mapping[str, Any]
    ) -> Any:
        if hint is bool:
            if not isinstance(raw, bool):
                raise self.fail(key, "true or false", raw)
            return raw
        if hint is int:
            low = siblings[s.floor] if s.floor else s.low
            assert s.high is not None, f"{key}: an integer field needs a high bound"
            if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= s.high:
                raise self.fail(key, f"an integer from {low} to {s.high}", raw)
            return raw
        if hint is float:
            return self.number(s, raw, key, siblings)
        if hint is str:
            if not isinstance(raw, str) or (s.choices and raw not in s.choices):
                expected = f"one of {', '.join(map(repr, s.choices))}" if s.choices else "a string"
                raise self.fail(key, expected, raw)
            return raw
        raise TypeError(f"{key}: the reader has no rule for {hint!r}")

    def number(self, s: Spec, raw: object, key: str, siblings: Mapping[str, Any]) -> float:
        ok = isinstance(raw, int | float) and not isinstance(raw, bool)
        if ok:
            number = float(raw)  # type: ignore[arg-type]
            ok = (number > 0 if s.positive else number >= 0) and math.isfinite(number)
            ok = ok and (s.high is None or number <= s.high)
        if not ok:
            bound = "a positive number" if s.positive else "a number >= 0"
            if s.high is not None:
                bound += f" up to {s.high}"
            raise self.fail(key, bound, raw)
        if s.floor and number < siblings[s.floor]:
            raise self.fail(key, f"at least {s.floor} ({siblings[s.floor]})", number)
        return number

    def member(self, hint: type[enum.Enum], s: Spec, raw: object, key: str) -> enum.Enum:
        """An enum member, by value if its values are strings (``MethodKind``), else by name."""
        by_value = all(isinstance(m.value, str) for m in hint)
        choices = s.choices or tuple(m.value if by_value else m.name for m in hint)
        text = self.scalar(str, Spec(choices=choices), raw, key, {})
        return hint(text) if by_value else hint[text]

    def many(self, item: Any, s: Spec, raw: object, key: str) -> tuple[Any, ...]:
        """A tuple field: of sections, of ``(key, value)`` pairs (a map) or of scalars."""
        if _is_section(item):
            return self.sections(item, s, raw, key)
        if typing.get_origin(item) is tuple:  # a map, in file order
            if not isinstance(raw, Mapping):
                raise self.fail(key, s.expected, raw)
            value_hint = typing.get_args(item)[1]
            pairs = []
            for name, value in raw.items():
                ekey = f"{key}.{name!r}"
                if s.check is not None:
                    self.guard(ekey, s.check, name)
                pairs.append((name, self.value(value_hint, _PLAIN, value, ekey, {})))
            return tuple(pairs)
        if not isinstance(raw, list):
            raise self.fail(key, s.expected, raw)
        # An array of scalars is a set: a value given twice counts once.
        return tuple(
            dict.fromkeys(self.value(item, s, v, f"{key}[{n}]", {}) for n, v in enumerate(raw))
        )

    def sections(self, item: type[T], s: Spec, raw: object, key: str) -> tuple[T, ...]:
        """An array of tables, or with ``s.keyed`` a table of tables keyed by that field."""
        if s.keyed:
            if not isinstance(raw, Mapping) or (s.nonempty and not raw):
                raise self.fail(key, s.expected, raw)
            name_field = _field(item, s.keyed)
            out = []
            for name, value in raw.items():
                ikey = f"{key}.{name}"
                self.value(hints(item)[s.keyed], spec_of(name_field), name, ikey, {})
                out.append(self.section(item, value, ikey, preset={s.keyed: name}))
            return tuple(out)
        if not isinstance(raw, list) or (s.nonempty and not raw):
            raise self.fail(key, s.expected, raw)
        out = []
        for n, value in enumerate(raw):
            ikey = f"{key}[{n}]"
            short = hints(item)[s.shorthand] if s.shorthand else None
            if short is not None and isinstance(value, short):  # "h:1" for { address = "h:1" }
                read = self.value(short, spec_of(_field(item, s.shorthand)), value, ikey, {})
                out.append(item(**{s.shorthand: read}))
            else:
                out.append(self.section(item, value, ikey))
        return tuple(out)


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(cls) if f.name == name)
