"""The FPGA device serving MiniLM from a compiled int8 bundle on the bit-exact model (fpga:golden)."""

import asyncio

import numpy as np
import pytest

from weft.hw.config import load_config
from weft.sw.devices import DeviceError, EncoderBundle, FpgaDevice, GoldenExecutor, ModelSet, make_devices

TEXTS = ["the quick brown fox", "an int8 accelerator", "jumps over the lazy dog and keeps running far away"]


@pytest.fixture(scope="module")
def models():
    return ModelSet.load(["minilm"], tiny=True)


def test_bundle_embeddings_match_the_float_model(models):
    cfg = load_config("default")
    enc = EncoderBundle.compile(models.minilm, cfg, seq_len=16, calibration=TEXTS)
    runs = []

    class Counting(GoldenExecutor):  # proves every sentence ran through the bundle
        def run(self, bundle, inputs):
            runs.append(bundle)
            return super().run(bundle, inputs)

    dev = FpgaDevice(cfg, models=models, encoder=enc, executor=Counting(cfg), name="fpga:golden")
    got = asyncio.run(dev.embed("minilm", TEXTS))
    assert len(runs) == len(TEXTS) and all(b is enc.bundle for b in runs)
    assert dev.describe()["values"] == "bundle:golden" and dev.describe()["seq_len"] == 16
    ref = models.minilm.encode(TEXTS, max_length=16)  # the float model on the same truncation
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.all(np.sum(got * ref, axis=1) > 0.999)
    # the third sentence is longer than 16 tokens: truncated like the tokenizer does, not refused
    assert models.minilm.tokenize([TEXTS[2]]).input_ids.shape[1] > 16


def test_compile_and_board_mode_errors(models):
    cfg = load_config("default")
    with pytest.raises(DeviceError, match="seq_len must be"):
        EncoderBundle.compile(models.minilm, cfg, seq_len=1)
    board = FpgaDevice(cfg, models=models, mode="board")
    with pytest.raises(DeviceError, match="compiled encoder"):
        asyncio.run(board.embed("minilm", ["x"]))
    with pytest.raises(DeviceError, match="fpga:emu, fpga:golden or fpga:sim"):
        make_devices("fpga:warp", models)


def test_make_devices_builds_fpga_golden(models):
    (dev,) = make_devices("fpga:golden", models, seq_len=8)
    assert dev.name == "fpga:golden" and dev.values == "bundle:golden" and dev.encoder.seq_len == 8
    v = asyncio.run(dev.embed("minilm", ["hello"]))
    assert v.shape == (1, models.minilm.config.hidden_size)
