"""Jinja templates in agent specs, rendered in a sandbox with undefined names an error.

Step results are :class:`Value` objects: ``{{ hits }}`` renders a result's text form (a generated
reply, retrieved documents one per line, a tool's output as JSON), while ``{{ hits[0].text }}`` or
``{{ call.output.total }}`` reach into its data.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["Value", "environment", "render", "render_value"]


class Value:
    """A step result in templates: ``str()`` is its text form; indexing and attributes read
    its JSON data."""

    __slots__ = ("text", "data")

    def __init__(self, text: str, data: Any) -> None:
        self.text, self.data = text, data

    def __str__(self) -> str:
        return self.text

    def __getitem__(self, key):
        return _wrap(self.data[key])

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        if isinstance(self.data, Mapping) and key in self.data:
            return _wrap(self.data[key])
        raise AttributeError(key)

    def __iter__(self):
        return iter(_wrap(x) for x in (self.data if isinstance(self.data, (list, tuple)) else [self.data]))

    def __len__(self) -> int:
        return len(self.data) if isinstance(self.data, (list, tuple, Mapping)) else 1


def _wrap(x):
    if isinstance(x, (dict, list)):
        return Value(json.dumps(x) if not (isinstance(x, dict) and "text" in x) else str(x["text"]), x)
    return x


@functools.lru_cache(maxsize=1)
def environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@functools.lru_cache(maxsize=1024)
def _compiled(text: str):
    return environment().from_string(text)


def render(text: str, context: Mapping[str, Any]) -> str:
    if "{" not in text:  # most strings are plain
        return text
    return _compiled(text).render(**context)


def render_value(value, context: Mapping[str, Any]):
    """Render every string inside a JSON value (tool arguments given in the spec)."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, dict):
        return {k: render_value(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, context) for v in value]
    return value
