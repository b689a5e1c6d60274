"""The declarative agent spec: a JSON document naming an agent's steps, tools and documents.

An agent is a program of steps run server-side, one after another (``parallel`` runs branches
of steps concurrently). Every step has an ``id``; later steps refer to earlier results, and to
the run's ``inputs``, through Jinja templates (``{{ input.question }}``, ``{{ hits }}``,
``{{ hits[0].text }}``), rendered in a sandbox with undefined names an error.

Step kinds (``op``):

``generate``  SmolLM2 chat on a *thread* (a conversation that later steps continue):
              ``messages`` are appended, the model's reply is the result.
``embed``     MiniLM embeddings of ``texts``.
``retrieve``  the ``k`` documents of the run's retrieval memory nearest to ``query`` (cosine
              similarity of MiniLM embeddings).
``remember``  adds ``texts`` to the retrieval memory.
``tool``      a tool call: SmolLM2 chooses the arguments (``tool_choice`` ``required``, ``auto`` or a
              tool name; decoding constrained to the tool's JSON schema unless ``auto``), or the
              spec gives ``arguments``; the arguments are validated against the schema, the tool
              runs (on the server, or on the client for ``"implementation": "client"``) and its
              output is appended to the thread.
``parallel``  ``branches``: lists of steps run concurrently; each branch has its own thread
              unless its steps name one; a failing branch cancels the others.

See docs/serving.md ("Agents") for the JSON and an example.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AgentSpec", "Step", "GenerateStep", "EmbedStep", "RetrieveStep", "RememberStep", "ToolStep",
           "ParallelStep", "ToolSpec", "Message", "SpecError", "iter_steps", "MAX_STEPS", "MAX_DOCUMENTS"]

MAX_STEPS = 64  # all steps, branches included
MAX_DOCUMENTS = 1024
MAX_TEXT_CHARS = 32768
_ID = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
_RESERVED = {"input", "inputs", "steps", "documents", "loop", "range", "dict", "lipsum", "cycler", "joiner",
             "namespace"}


class SpecError(ValueError):
    """An agent spec that cannot run (unknown references, tools, duplicate ids...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


class _StepBase(_Strict):
    id: str = Field(pattern=_ID)

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in _RESERVED:
            raise ValueError(f"step id {v!r} is reserved")
        return v


class _Sampling(_Strict):
    max_tokens: int = Field(128, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    #: conversation the step continues; ``null``: a one-off conversation
    thread: str | None = Field("main", pattern=_ID)


class GenerateStep(_StepBase, _Sampling):
    op: Literal["generate"]
    messages: list[Message] = Field(default_factory=list, max_length=64)


class EmbedStep(_StepBase):
    op: Literal["embed"]
    texts: list[str] = Field(min_length=1, max_length=256)


class RetrieveStep(_StepBase):
    op: Literal["retrieve"]
    query: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    k: int = Field(3, ge=1, le=64)


class RememberStep(_StepBase):
    op: Literal["remember"]
    texts: list[str] = Field(min_length=1, max_length=256)


class ToolStep(_StepBase, _Sampling):
    op: Literal["tool"]
    messages: list[Message] = Field(default_factory=list, max_length=64)
    #: the tools the model may call (default: all of the spec's)
    tools: list[str] | None = None
    tool_choice: str = "required"  # "required", "auto" or a tool name
    #: call the tool with these arguments (templates allowed) instead of asking the model
    arguments: dict[str, Any] | None = None
    max_tokens: int = Field(256, ge=1, le=1024)


class ParallelStep(_StepBase):
    op: Literal["parallel"]
    branches: list[list[Step]] = Field(min_length=1, max_length=16)


Step = Annotated[Union[GenerateStep, EmbedStep, RetrieveStep, RememberStep, ToolStep, ParallelStep],
                 Field(discriminator="op")]
ParallelStep.model_rebuild()


class ToolFunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict) -> dict:
        if v.get("type", "object") != "object" or not isinstance(v.get("properties", {}), dict):
            raise ValueError("a tool's parameters must be a JSON schema of type object with properties")
        if not isinstance(v.get("required", []), list):
            raise ValueError("'required' must be a list of property names")
        return v


class ToolSpec(_Strict):
    """An OpenAI-style tool (``{"type": "function", "function": {name, description, parameters}}``)
    and the implementation that runs it: a server-side tool (default: the one registered under the
    tool's name), or ``"client"`` (the run waits for the client to post the output)."""

    type: Literal["function"] = "function"
    function: ToolFunctionSpec
    implementation: str | None = None

    @property
    def name(self) -> str:
        return self.function.name

    def openai(self) -> dict:
        return {"type": "function", "function": self.function.model_dump()}


class AgentSpec(_Strict):
    name: str = Field("agent", max_length=128)
    system: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    documents: list[str] = Field(default_factory=list, max_length=MAX_DOCUMENTS)
    tools: list[ToolSpec] = Field(default_factory=list, max_length=32)
    steps: list[Step] = Field(min_length=1)
    #: the step whose result is the run's output (default: the last top-level step)
    output: str | None = None

    @field_validator("documents")
    @classmethod
    def _docs(cls, v: list[str]) -> list[str]:
        for i, d in enumerate(v):
            if not d.strip():
                raise ValueError(f"document {i} is empty")
            if len(d) > MAX_TEXT_CHARS:
                raise ValueError(f"document {i} has {len(d)} characters (limit {MAX_TEXT_CHARS})")
        return v

    @model_validator(mode="after")
    def _references(self) -> AgentSpec:
        check_spec(self)
        return self


def iter_steps(steps) -> list:
    """Every step, depth first (branches of parallel steps included)."""
    out = []
    for s in steps:
        out.append(s)
        if isinstance(s, ParallelStep):
            for b in s.branches:
                out.extend(iter_steps(b))
    return out


def _template_names(text: str) -> set[str]:
    """Top-level names a Jinja template reads (raises on a syntax error)."""
    from jinja2 import meta

    from .templates import environment

    return set(meta.find_undeclared_variables(environment().parse(text)))


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def check_spec(spec: AgentSpec) -> None:
    """Static checks: unique step ids, step count, tools known to the spec, templates that only
    read the inputs and steps finished before them (a branch sees the steps before its parallel
    step and the earlier steps of its own branch)."""
    everything = iter_steps(spec.steps)
    if len(everything) > MAX_STEPS:
        raise ValueError(f"the agent has {len(everything)} steps; the limit is {MAX_STEPS}")
    ids = [s.id for s in everything]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate step ids: {', '.join(dup)}")
    tool_names = [t.name for t in spec.tools]
    if len(set(tool_names)) != len(tool_names):
        raise ValueError("tool names must be unique")
    if spec.output is not None and spec.output not in ids:
        raise ValueError(f"output names step {spec.output!r}, which is not a step id")

    def walk(steps, seen: set[str]) -> set[str]:
        for s in steps:
            texts: list[str] = []
            if isinstance(s, (GenerateStep, ToolStep)):
                texts = [m.content for m in s.messages]
            elif isinstance(s, (EmbedStep, RememberStep)):
                texts = list(s.texts)
            elif isinstance(s, RetrieveStep):
                texts = [s.query]
            if isinstance(s, ToolStep):
                texts += _strings(s.arguments or {})
                if not spec.tools:
                    raise ValueError(f"step {s.id!r} calls a tool but the agent declares no tools")
                for n in s.tools or []:
                    if n not in tool_names:
                        raise ValueError(f"step {s.id!r} names tool {n!r}, which the agent does not declare")
                allowed = s.tools or tool_names
                if s.tool_choice not in ("required", "auto") and s.tool_choice not in allowed:
                    raise ValueError(f"step {s.id!r}: tool_choice {s.tool_choice!r} is not 'required', 'auto' "
                                     f"or one of the step's tools ({', '.join(allowed)})")
                if s.arguments is not None and s.tool_choice in ("required", "auto") and len(allowed) != 1:
                    raise ValueError(f"step {s.id!r} gives arguments: name the tool with tool_choice")
            for t in texts:
                try:
                    names = _template_names(t)
                except Exception as exc:
                    raise ValueError(f"step {s.id!r}: bad template {t[:60]!r}: {exc}") from None
                unknown = sorted(n for n in names if n not in seen and n != "input")
                if unknown:
                    later = [n for n in unknown if n in ids]
                    why = (f"{', '.join(later)} {'is' if len(later) == 1 else 'are'} not finished before it "
                           "(a later step, or one in another branch of a parallel step)"
                           if later else "not an input or step id (inputs are read as input.NAME)")
                    raise ValueError(f"step {s.id!r} reads {', '.join(unknown)}: {why}")
            if isinstance(s, ParallelStep):
                after = set(seen)  # branches do not see each other's steps; later steps see them all
                for b in s.branches:
                    after |= walk(b, set(seen))
                seen = after
            seen = seen | {s.id}
        return seen

    walk(spec.steps, set())
