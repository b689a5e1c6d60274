"""Server-side tool implementations an agent spec can call.

A spec declares each tool with an OpenAI-style JSON schema (what the model sees and what the
arguments are validated against) and names its implementation here (default: the tool's own
name). Implementations are Python callables ``fn(arguments, context)``, plain or async,
registered in a :class:`ToolRegistry`; :func:`default_tools` has:

``calculator``        ``{"expression": "2 * (3 + 4)"}`` -> the number (+ - * / // % **, parentheses)
``search_documents``  ``{"query": "...", "k": 3}`` -> the run's retrieval memory's nearest documents
``echo``              returns its arguments (wiring tests, demos)
"""

from __future__ import annotations

import ast
import inspect
import operator
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ToolContext", "ToolRegistry", "ToolError", "default_tools", "calculate"]


class ToolError(RuntimeError):
    """A tool refused its arguments or failed; the message goes to the run's error."""


@dataclass
class ToolContext:
    """What a tool can use: the run's id, its retrieval memory and its step id."""

    run_id: str
    step_id: str
    memory: Any  # RetrievalMemory


ToolFn = Callable[[Mapping[str, Any], ToolContext], Any | Awaitable[Any]]


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, ToolFn] = {}

    def register(self, name: str, fn: ToolFn | None = None):
        """``registry.register("name", fn)`` or as a decorator ``@registry.register("name")``."""
        if fn is None:
            return lambda f: self.register(name, f)
        if not callable(fn):
            raise TypeError(f"tool {name!r}: {fn!r} is not callable")
        self._tools[name] = fn
        return fn

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    async def call(self, name: str, arguments: Mapping[str, Any], context: ToolContext) -> Any:
        fn = self._tools.get(name)
        if fn is None:
            raise ToolError(f"no tool implementation {name!r}; this server has {', '.join(self.names())}")
        out = fn(dict(arguments), context)
        if inspect.isawaitable(out):
            out = await out
        return out


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> float | int:
    """Arithmetic on numbers only (no names, calls or attributes): parsed with :mod:`ast`."""
    if not isinstance(expression, str) or len(expression) > 200:
        raise ToolError("expression must be a string of at most 200 characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise ToolError("exponent too large")
            try:
                return _BINOPS[type(node.op)](a, b)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ToolError(f"unsupported element in {expression!r}: only numbers and + - * / // % ** ( )")

    return ev(tree)


async def _search(args, ctx: ToolContext):
    query = args.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ToolError("search_documents needs a non-empty 'query' string")
    k = args.get("k", 3)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
        raise ToolError("'k' must be an integer from 1 to 64")
    return [h.to_dict() for h in await ctx.memory.search(query, k)]


def default_tools() -> ToolRegistry:
    reg = ToolRegistry()
    reg.register("calculator", lambda args, ctx: calculate(args.get("expression")))
    reg.register("search_documents", _search)
    reg.register("echo", lambda args, ctx: dict(args))
    return reg
