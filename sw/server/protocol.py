"""OpenAI-compatible request bodies (pydantic) and error bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from weft.sw.agents.spec import AgentSpec

__all__ = ["ApiError", "error_body", "ChatMessage", "ToolFunction", "Tool", "ChatCompletionRequest",
           "CompletionRequest", "EmbeddingRequest", "AgentRunRequest", "ToolOutputsRequest"]


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ToolCallFunction(_Model):
    name: str
    arguments: str = "{}"


class ToolCall(_Model):
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)


class ToolFunction(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(_Model):
    type: Literal["function"] = "function"
    function: ToolFunction


class _Sampling(_Model):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    # weft extensions
    priority: int = Field(0, ge=-100, le=100)
    session: str | None = Field(None, max_length=128)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False


class EmbeddingRequest(_Model):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class ToolOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tool_call_id: str = Field(max_length=64)
    output: Any = None


class ToolOutputsRequest(BaseModel):
    """``POST /v1/agents/runs/{id}/tool_outputs``: outputs of the client tool calls a run waits for."""

    model_config = ConfigDict(extra="forbid")
    tool_outputs: list[ToolOutput] = Field(min_length=1, max_length=32)


class AgentRunRequest(BaseModel):
    """``POST /v1/agents/runs``: the agent spec (see :mod:`weft.sw.agents.spec`), its inputs
    (read by templates as ``input.NAME``) and whether to answer with the event stream."""

    model_config = ConfigDict(extra="forbid")
    agent: AgentSpec
    input: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
