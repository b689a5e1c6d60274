"""OpenAI-compatible HTTP serving over the scheduler: :func:`create_app` (FastAPI),
:func:`serve` (uvicorn, blocking) and :class:`ServerThread` (a server on 127.0.0.1 in a
background thread, for tests and benchmarks)."""

from .app import ServerSettings, create_app
from .protocol import ApiError
from .run import ServerThread, serve

__all__ = ["ApiError", "ServerSettings", "ServerThread", "create_app", "serve"]
