"""Tool calling for SmolLM2 through its chat template.

* :func:`tools_system_prompt` lists the tools (JSON schemas) in a system message, in the
  ``<tools>...</tools>`` / ``<tool_call>...</tool_call>`` format SmolLM2's instruct data uses; the
  rendered conversation then goes through the tokenizer's own chat template.
* :func:`parse_tool_calls` finds ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks in generated text.
* :class:`ToolCallConstraint` is a logits processor for ``tool_choice`` "required" or a named
  function: generation is constrained so the output *is* such a block, with the arguments
  following the function's JSON schema (objects with their properties, strings, numbers,
  integers, booleans, enums, arrays of one item). The model still chooses the tool (for
  "required") and every value; the constraint only rules out text that would not parse.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["tools_system_prompt", "parse_tool_calls", "ToolCallConstraint", "validate_arguments"]

_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def tools_system_prompt(tools: Sequence[Mapping], base: str = "") -> str:
    listed = "\n".join(json.dumps({"type": "function", "function": dict(t["function"])}) for t in tools)
    head = (base + "\n\n") if base else ""
    return (f"{head}You are a function calling AI model. You may call one or more functions to assist "
            f"with the user query. The functions you can call are listed in <tools></tools>:\n"
            f"<tools>\n{listed}\n</tools>\nFor each call, return a JSON object with the function name and "
            f"arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
            f'{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def parse_tool_calls(text: str, names: Sequence[str]) -> tuple[list[dict], str]:
    """(tool calls in OpenAI's shape, the text outside the blocks). Blocks that do not parse or
    name an unknown function are left in the text."""
    calls, rest, pos = [], [], 0
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
            name, args = obj["name"], obj.get("arguments", {})
            if name not in names or not isinstance(args, dict):
                raise ValueError(name)
        except (ValueError, KeyError, TypeError):
            continue
        rest.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args)}})
    rest.append(text[pos:])
    return calls, "".join(rest).strip()


def validate_arguments(args: Mapping, schema: Mapping) -> list[str]:
    """Problems of ``args`` against a (simple) JSON schema: required keys, types, enums."""
    problems = []
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
             "array": list}
    for key in schema.get("required", []):
        if key not in args:
            problems.append(f"missing required argument {key!r}")
    for key, sub in schema.get("properties", {}).items():
        if key not in args:
            continue
        t = sub.get("type")
        if t in types and not isinstance(args[key], types[t]) or (t in ("integer", "number")
                                                                 and isinstance(args[key], bool)):
            problems.append(f"argument {key!r} should be {t}")
        if "enum" in sub and args[key] not in sub["enum"]:
            problems.append(f"argument {key!r} should be one of {sub['enum']}")
    return problems


# ---------------------------------------------------------------------------- constraint
@dataclass(frozen=True)
class _Lit:
    text: str


@dataclass(frozen=True)
class _Str:
    max_chars: int = 48


@dataclass(frozen=True)
class _Num:
    integer: bool


@dataclass(frozen=True)
class _Choice:
    options: tuple[str, ...]


def _segments(schema: Mapping, depth: int = 0) -> list:
    t = schema.get("type")
    if "enum" in schema:
        return [_Choice(tuple(json.dumps(v) for v in schema["enum"]))]
    if t == "object" or "properties" in schema:
        props = dict(schema.get("properties", {}))
        keys = list(schema.get("required") or props)
        if depth > 4 or not keys:
            return [_Lit("{}")]
        segs: list = []
        for i, k in enumerate(keys):
            segs.append(_Lit(("{" if i == 0 else ", ") + json.dumps(k) + ": "))
            segs.extend(_segments(props.get(k, {"type": "string"}), depth + 1))
        segs.append(_Lit("}"))
        return segs
    if t == "array":
        return [_Lit("[")] + _segments(schema.get("items", {"type": "string"}), depth + 1) + [_Lit("]")]
    if t == "boolean":
        return [_Choice(("true", "false"))]
    if t in ("integer", "number"):
        return [_Num(t == "integer")]
    return [_Lit('"'), _Str()]


def _merge(segs: list) -> list:
    out: list = []
    for s in segs:
        if isinstance(s, _Lit) and out and isinstance(out[-1], _Lit):
            out[-1] = _Lit(out[-1].text + s.text)
        else:
            out.append(s)
    return out


_NUM_CHARS = set("0123456789")


class ToolCallConstraint:
    """Logits processor making the output one ``<tool_call>`` block for ``tools`` (all of them
    allowed: "required"; or one name: a named ``tool_choice``). Call as ``f(output_ids, logits)``."""

    HEADER = '<tool_call>\n{"name": '

    def __init__(self, tokenizer, tools: Sequence[Mapping], *, top_k: int = 256) -> None:
        self.tok = tokenizer
        self.schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools}
        self.top_k = top_k
        stop = [i for i in tokenizer.stop_ids]
        im_end = tokenizer.token_to_id("<|im_end|>")
        self.stop_id = im_end if im_end is not None else stop[0]
        self._strs: dict[int, str] = {}

    def _str(self, i: int) -> str:
        s = self._strs.get(i)
        if s is None:
            s = self._strs[i] = self.tok.decode([i], skip_special_tokens=False)
        return s

    def plan(self, name: str | None) -> list:
        head = [_Lit(self.HEADER), _Choice(tuple(json.dumps(n) for n in self.schemas))]
        if name is None:
            return head
        return _merge(head + [_Lit(', "arguments": ')] + _segments(self.schemas[name]) + [_Lit("}\n</tool_call>")])

    def _name_of(self, text: str) -> str | None:
        rest = text[len(self.HEADER):] if text.startswith(self.HEADER) else ""
        for n in self.schemas:
            if rest.startswith(json.dumps(n)):
                return n
        return None

    def _state(self, text: str):
        """(segment, partial text inside it, following literal) where ``text`` ends, or
        (None, "", "") when the block is complete."""
        segs = self.plan(self._name_of(text))
        pos = 0
        for i, seg in enumerate(segs):
            rest = text[pos:]
            nxt = segs[i + 1].text if i + 1 < len(segs) and isinstance(segs[i + 1], _Lit) else ""
            if isinstance(seg, _Lit):
                if rest.startswith(seg.text):
                    pos += len(seg.text)
                    continue
                return seg, rest, nxt
            if isinstance(seg, _Str):
                j = rest.find('"')
                if j < 0:
                    return seg, rest, nxt
                pos += j + 1
                continue
            if isinstance(seg, _Num):
                j = 0
                while j < len(rest) and (rest[j] in _NUM_CHARS or (j == 0 and rest[j] == "-")
                                         or (rest[j] == "." and not seg.integer and "." not in rest[:j])):
                    j += 1
                if j == len(rest):
                    return seg, rest, nxt
                pos += j
                continue
            if isinstance(seg, _Choice):
                done = [o for o in seg.options if rest.startswith(o)]
                if not done:
                    return seg, rest, nxt
                pos += len(max(done, key=len))
                continue
        return None, "", ""

    def _force(self, text: str) -> int:
        """The first token of ``text`` (a literal's remainder)."""
        return self.tok.encode(text)[0]

    def __call__(self, output: list[int], logits: torch.Tensor) -> torch.Tensor:
        text = self.tok.decode(output, skip_special_tokens=False)
        seg, part, nxt = self._state(text)
        choice = self._pick(seg, part, nxt, logits)
        out = torch.full_like(logits, float("-inf"))
        out[choice] = 0.0
        return out

    def _pick(self, seg, part: str, nxt: str, logits: torch.Tensor) -> int:
        if seg is None:
            return self.stop_id
        if isinstance(seg, _Lit):
            return self._force(seg.text[len(part):])
        order = torch.argsort(logits, descending=True)[: self.top_k].tolist()
        if isinstance(seg, _Choice):
            live = [o for o in seg.options if o.startswith(part)]
            for i in order:
                s = self._str(i)
                if s and any(o.startswith(part + s) for o in live):
                    return i
            return self._force(live[0][len(part):])
        if isinstance(seg, _Str):
            if len(part) >= seg.max_chars:
                return self._force('"')
            for i in order:
                s = self._str(i)
                if not s or "\\" in s or any(ord(c) < 32 for c in s):
                    continue
                if '"' not in s:
                    return i
                if s == '"' or (s.endswith('"') and s.count('"') == 1):
                    return i
            return self._force('"')
        # number
        for i in order:
            s = self._str(i)
            if not s:
                continue
            if all(c in _NUM_CHARS for c in s) and len(part) + len(s) <= 12:
                if part in ("0", "-0") and seg.integer:
                    continue
                return i
            if part and part != "-" and nxt and nxt.startswith(s[:1]) and nxt.startswith(s):
                return i
            if part and part != "-" and nxt and s and nxt.startswith(s[0]):
                return self._force(nxt)
        return self._force(nxt) if part and part != "-" else self._force("0")
