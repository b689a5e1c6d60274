"""Agent programs run server-side on the scheduler.

* :mod:`.spec` -- the declarative agent spec (JSON): steps (``generate``, ``embed``,
  ``retrieve``, ``remember``, ``tool``, ``parallel``), tools with JSON schemas, documents;
* :mod:`.memory` -- :class:`RetrievalMemory`, top-k cosine search over MiniLM embeddings;
* :mod:`.tools` -- server-side tool implementations (:class:`ToolRegistry`);
* :mod:`.runner` -- :class:`AgentRunner`: runs specs as tasks on an
  :class:`~weft.sw.scheduler.Engine`, one scheduler session per conversation thread, with an
  event log per run (the HTTP API under ``/v1/agents/runs`` streams it).
"""

from .memory import Hit, RetrievalMemory
from .runner import CLIENT, AgentRun, AgentRunner, RunNotWaiting, RunnerBusy, StepError
from .spec import AgentSpec, SpecError
from .tools import ToolContext, ToolError, ToolRegistry, calculate, default_tools

__all__ = ["CLIENT", "AgentRun", "AgentRunner", "RunNotWaiting", "AgentSpec", "Hit", "RetrievalMemory", "RunnerBusy", "SpecError", "StepError",
           "ToolContext", "ToolError", "ToolRegistry", "calculate", "default_tools"]
