"""A retrieval memory on sentence embeddings: add documents, find the nearest by cosine.

The memory does not embed by itself: it is given an async ``embed(texts) -> (n, dim) array``
(the agent runner's goes through the scheduler, so the MiniLM work runs on whatever device the
engine places it on, an FPGA device included). Vectors are stored unit-normalized in one numpy
matrix; a search is one matrix-vector product.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Hit", "RetrievalMemory"]

EmbedFn = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass(frozen=True)
class Hit:
    index: int  # position in the memory (insertion order)
    text: str
    score: float  # cosine similarity to the query

    def to_dict(self) -> dict:
        return {"index": self.index, "text": self.text, "score": self.score}


class RetrievalMemory:
    """Documents and their unit-norm embeddings. ``await add(texts)``, ``await search(query, k)``."""

    def __init__(self, embed: EmbedFn, *, batch: int = 32, max_documents: int = 4096) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._embed = embed
        self.batch = batch
        self.max_documents = max_documents
        self.texts: list[str] = []
        self.vectors: np.ndarray | None = None
        self._lock = asyncio.Lock()  # concurrent branches add in a defined order

    def __len__(self) -> int:
        return len(self.texts)

    async def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        chunks = [list(texts[i:i + self.batch]) for i in range(0, len(texts), self.batch)]
        parts = await asyncio.gather(*(self._embed(c) for c in chunks))
        out = np.concatenate([np.asarray(p, np.float32).reshape(len(c), -1) for p, c in zip(parts, chunks)])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        if not np.all(np.isfinite(out)) or np.any(norms == 0):
            raise ValueError("the embedding model returned a zero or non-finite vector")
        return out / norms

    async def add(self, texts: Sequence[str]) -> list[int]:
        """Embed and store ``texts``; returns their indices."""
        texts = [str(t) for t in texts]
        if any(not t.strip() for t in texts):
            raise ValueError("documents must not be empty")
        if len(self.texts) + len(texts) > self.max_documents:
            raise ValueError(f"the memory holds at most {self.max_documents} documents")
        if not texts:
            return []
        vecs = await self._vectors(texts)
        async with self._lock:
            if self.vectors is not None and vecs.shape[1] != self.vectors.shape[1]:
                raise ValueError(f"embedding width {vecs.shape[1]} differs from the memory's {self.vectors.shape[1]}")
            start = len(self.texts)
            self.texts.extend(texts)
            self.vectors = vecs if self.vectors is None else np.concatenate([self.vectors, vecs])
        return list(range(start, start + len(texts)))

    async def search(self, query: str, k: int = 3) -> list[Hit]:
        """The ``k`` stored documents most similar to ``query``, best first (ties: earlier first)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        if not query.strip():
            raise ValueError("the query must not be empty")
        if not self.texts:
            return []
        q = (await self._vectors([query]))[0]
        scores = self.vectors @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(int(i), self.texts[i], float(scores[i])) for i in order]
