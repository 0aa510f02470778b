"""DFKD plug-ins: terms and state on top of any method, one file each (``gendistill dfkd --plugins NAME,...``)."""

from __future__ import annotations

import dataclasses
import typing

from ...errors import UsageError
from .abd import ABD
from .base import Plugin, PluginConfig
from .faqd import FAQD
from .lra import LRA

PLUGINS: dict[str, type[Plugin]] = {cls.name: cls for cls in (ABD, FAQD, LRA)}

__all__ = ["ABD", "FAQD", "LRA", "PLUGINS", "Plugin", "PluginConfig", "build_plugins", "get_plugin"]


def get_plugin(name: str) -> type[Plugin]:
    if name not in PLUGINS:
        raise UsageError(f"unknown DFKD plug-in {name!r}; valid: {', '.join(sorted(PLUGINS))}")
    return PLUGINS[name]


def build_plugins(names: list[str], options: list[str] | None = None, *, convert=None) -> list[Plugin]:
    """The plug-ins ``names`` (in order, each at most once), configured by ``options`` items ``name.key=value``.
    ``convert(text, type, what)`` turns an option's text into its field's type (the recipe parser's conversion);
    None keeps the text."""
    if len(set(names)) != len(names):
        raise UsageError(f"plug-ins {names} name one twice")
    classes = [get_plugin(name) for name in names]
    chosen: dict[str, dict] = {name: {} for name in names}
    for item in options or []:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise UsageError(f"plug-in option {item!r} is not name.key=value (e.g. faqd.fa=2)")
        if name not in chosen:
            raise UsageError(f"plug-in option {item!r} is for {name!r}, which is not among --plugins {names}")
        hints = typing.get_type_hints(get_plugin(name).Config)
        if key not in hints:
            fields = ", ".join(f.name for f in dataclasses.fields(get_plugin(name).Config))
            raise UsageError(f"plug-in option {item!r}: {name} has no option {key!r}; valid: {fields}")
        chosen[name][key] = value if convert is None else convert(value, hints[key], f"plug-in option {item!r}")
    return [cls(**chosen[cls.name]) for cls in classes]
