"""Devices and cost models: CPU (reference models), emulated FPGA, simulated, GPU (skips without CUDA)."""

import asyncio
import time

import numpy as np
import pytest
import torch

from weft.hw.config import load_config
from weft.sw.devices import (DeviceError, DeviceFailure, FpgaCostModel, FpgaDevice, LinearCostModel, ModelSet, Seq,
                             SimDevice, TorchDevice, cuda_available, make_devices)
from weft.sw.devices.cost import minilm_gemms
from weft.sw.models import smollm2 as s


@pytest.fixture(scope="module")
def models():
    return ModelSet.load(tiny=True)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WEFT_CACHE", str(tmp_path))


def test_linear_cost_model_fits_and_corrects_online():
    truth = {"embed": (0.002, 1e-5, 1e-8), "prefill": (0.01, 2e-4, 0.0), "decode": (0.005, 0.001, 1e-6)}
    samples = []
    for b in (1, 4, 16):
        for t in (8, 32, 128):
            samples.append(("embed", {"batch": b, "tokens": t}, truth["embed"][0] + truth["embed"][1] * b * t
                            + truth["embed"][2] * b * t * t))
    for t in (8, 64, 256):
        samples.append(("prefill", {"tokens": t}, 0.01 + 2e-4 * t))
    for b in (1, 4, 8):
        for c in (16, 128):
            samples.append(("decode", {"batch": b, "context": c}, 0.005 + 0.001 * b + 1e-6 * b * c))
    m = LinearCostModel.fit(samples)
    for op, shape, t in samples:
        assert m.predict(op, **shape) == pytest.approx(t, rel=1e-6)
    for _ in range(30):  # the device turns out twice as slow
        m.observe("decode", 2 * m.base("decode", batch=4, context=64), batch=4, context=64)
    assert m.factor["decode"] == pytest.approx(2.0, rel=0.01)
    assert m.predict("decode", batch=4, context=64) == pytest.approx(2 * m.base("decode", batch=4, context=64), rel=0.01)
    assert m.factor["embed"] == 1.0


def test_fpga_cost_model_comes_from_the_compiler_perf_model():
    from weft.compiler.perf import gemm_cost

    cfg = load_config("default")
    m = FpgaCostModel(cfg, host_overhead_s=0.0)
    cycles = sum(gemm_cost(cfg, M, N, K, output=o, count=c).total_cycles for _, M, N, K, c, o in minilm_gemms(2, 32))
    assert m.predict("embed", batch=2, tokens=32) == pytest.approx(cycles / 200e6)
    assert m.predict("embed", batch=8, tokens=32) > m.predict("embed", batch=2, tokens=32)
    assert m.predict("embed", batch=2, tokens=128) > m.predict("embed", batch=2, tokens=32)
    assert m.predict("decode", batch=1, context=8) == float("inf")  # no generation on the FPGA yet
    slow = FpgaCostModel(load_config("ulx3s"), host_overhead_s=0.0)
    assert slow.predict("embed", batch=2, tokens=32) > m.predict("embed", batch=2, tokens=32)


def test_cpu_device_embeddings_equal_the_reference_model(models):
    dev = TorchDevice(models, "cpu")
    texts = ["hello world", "a much longer sentence about fpgas"]
    got = asyncio.run(dev.embed("minilm", texts))
    np.testing.assert_allclose(got, models.minilm.encode(texts), atol=1e-5)
    assert dev.capabilities.serves("minilm", "embed") and dev.capabilities.serves("smollm2", "generate")
    with pytest.raises(DeviceError):
        asyncio.run(dev.embed("smollm2", texts))


def _greedy_by_steps(dev, prompts, n):
    seqs = [Seq(f"s{i}", "smollm2", p, n) for i, p in enumerate(prompts)]

    async def run():
        out = await dev.step("smollm2", seqs, [])
        for _ in range(n - 1):
            for q in seqs:
                q.output.append(out[q.seq_id])
            out = await dev.step("smollm2", [], seqs)
        for q in seqs:
            q.output.append(out[q.seq_id])
    asyncio.run(run())
    return [q.output for q in seqs]


def test_cpu_device_continuous_batching_matches_reference_generate(models):
    dev = TorchDevice(models, "cpu")
    prompts = [models.smollm2_tokenizer.encode("hello there"), models.smollm2_tokenizer.encode("abc")]
    got = _greedy_by_steps(dev, prompts, 6)
    for p, g in zip(prompts, got):
        ref = [t.id for t in s.generate(models.smollm2, None, p, 6, stop_ids=[])]
        assert g == ref
    assert dev.memory().kv_used_tokens == sum(len(p) + 5 for p in prompts)
    for i in range(2):
        dev.free(f"s{i}")
    assert dev.memory().kv_used_tokens == 0


def test_session_pin_reuses_the_kv_prefix(models):
    dev = TorchDevice(models, "cpu")
    tok = models.smollm2_tokenizer
    first = Seq("a", "smollm2", tok.encode("step one"), 3, session="S")
    out = asyncio.run(dev.step("smollm2", [first], []))
    first.output.append(out["a"])
    assert dev.pin(first, "S") == len(first.prompt)
    assert dev.memory().kv_pinned_tokens == len(first.prompt)
    follow = tok.encode("step one") + [out["a"]] + tok.encode(" tool result")
    second = Seq("b", "smollm2", follow, 3, session="S")
    got = asyncio.run(dev.step("smollm2", [second], []))
    ref = Seq("c", "smollm2", follow, 3)
    want = asyncio.run(TorchDevice(models, "cpu", profile=False).step("smollm2", [ref], []))
    assert got["b"] == want["c"] and dev.prefix_hits == 1


def test_profile_is_cached_on_disk(models, tmp_path):
    a = TorchDevice(models, "cpu")
    assert a.profile_from_cache is False
    assert list((tmp_path / "profiles").glob("cpu-*.json"))
    b = TorchDevice(models, "cpu")
    assert b.profile_from_cache is True
    assert b.cost.coef == a.cost.coef
    assert b.cost.predict("decode", batch=4, context=64) > 0


def test_emulated_fpga_paces_to_the_performance_model(models):
    cfg = load_config("ulx3s")  # slow enough that pacing dominates
    dev = FpgaDevice(cfg, models=models)
    texts = ["pace me to the board"] * 4
    t = time.perf_counter()
    got = asyncio.run(dev.embed("minilm", texts))
    elapsed = time.perf_counter() - t
    lengths = models.minilm.tokenize(texts).input_ids.shape[1]
    board = FpgaCostModel(cfg, encoder=dict(hidden=64, heads=4, intermediate=256, layers=2)).predict(
        "embed", batch=4, tokens=lengths)
    assert elapsed >= board * 0.99
    np.testing.assert_allclose(got, models.minilm.encode(texts), atol=1e-5)  # values: CPU reference
    info = dev.describe()
    assert info["values"] == "cpu-reference" and info["mode"] == "emu" and dev.name == "fpga:emu"
    assert not dev.capabilities.generate_models


def test_fpga_device_runs_a_bundle_through_the_golden_executor():
    from weft.compiler.gemm import build_gemm_bundle

    cfg = load_config("default")
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (32, 16), dtype=np.int8)
    a = rng.integers(-128, 128, (8, 32), dtype=np.int8)
    bundle = build_gemm_bundle(cfg, w, 8)
    dev = FpgaDevice(cfg)
    outputs, stats = asyncio.run(dev.run_bundle(bundle, {bundle.inputs[0].name: a}))
    out = outputs[bundle.outputs[0].name]
    np.testing.assert_array_equal(out, a.astype(np.int32) @ w.astype(np.int32))
    assert stats.macs == 8 * 32 * 16


def test_a_killed_device_raises_device_failure(models):
    dev = TorchDevice(models, "cpu", profile=False)
    dev.kill("test")
    with pytest.raises(DeviceFailure):
        asyncio.run(dev.embed("minilm", ["x"]))
    sim = SimDevice("s", LinearCostModel({"embed": (0.001, 0, 0)}))
    sim.kill()
    with pytest.raises(DeviceFailure):
        asyncio.run(sim.embed("minilm", ["x"]))


def test_make_devices(models):
    devs = make_devices("fpga:emu,cpu,null", models, profile=False)
    assert [d.name for d in devs] == ["fpga:emu", "cpu", "null"]
    assert [d.kind for d in devs] == ["fpga", "cpu", "null"]
    with pytest.raises(DeviceError, match="unknown device"):
        make_devices("tpu", models)
    if not cuda_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            make_devices("gpu", models)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_gpu_device_matches_cpu(models):
    gpu = TorchDevice(models, "cuda")
    cpu = TorchDevice(models, "cpu", profile=False)
    texts = ["hello gpu", "second sentence"]
    np.testing.assert_allclose(asyncio.run(gpu.embed("minilm", texts)), asyncio.run(cpu.embed("minilm", texts)),
                               atol=1e-4)
    prompt = [models.smollm2_tokenizer.encode("hi")]
    assert _greedy_by_steps(gpu, prompt, 4) == _greedy_by_steps(cpu, prompt, 4)
    assert gpu.kind == "gpu" and gpu.memory().kv_capacity_tokens > 0
    assert torch.cuda.is_available()
