"""Devices as Ray actors (weft serve --ray) on a small local Ray instance, tiny random models.

One module-scoped Ray instance (2 CPUs and one custom ``FPGA`` resource) and one set of actors
serve every test here; references are the same tiny models run in this process."""

import asyncio
import os

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from weft.sw.devices import DeviceError, ModelSet, make_ray_devices  # noqa: E402
from weft.sw.devices.remote import DeviceHost, RayDevice, _local_tokenizers  # noqa: E402
from weft.sw.models import smollm2 as s  # noqa: E402
from weft.sw.scheduler import Engine, Request  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    os.environ.setdefault("WEFT_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's future default; quiets a warning
    ray.init(num_cpus=2, resources={"FPGA": 1}, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        devices = make_ray_devices("fpga:emu,cpu", ["minilm", "smollm2"], tiny=True, profile=False)
        yield {d.name: d for d in devices}
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def models():
    return ModelSet.load(tiny=True)


def _proxies(cluster):
    # fresh proxies on the same actors: an engine closes its devices, the actors stay
    tok = _local_tokenizers(["minilm", "smollm2"], tiny=True)
    return [RayDevice.connect(d.actor, tok) for d in cluster.values()]


def test_devices_run_in_actors_placed_by_custom_resources(cluster):
    fpga, cpu = cluster["fpga:emu"], cluster["cpu"]
    assert fpga.kind == "fpga" and cpu.kind == "cpu"
    assert {fpga.pid, cpu.pid}.isdisjoint({os.getpid()}) and fpga.pid != cpu.pid
    # the FPGA actor holds the cluster's only FPGA resource; the CPU actor one of its 2 CPUs
    assert ray.available_resources().get("FPGA", 0) == 0
    assert ray.available_resources().get("CPU", 0) == pytest.approx(1)
    assert fpga.capabilities.embed_models == {"minilm"} and not fpga.capabilities.generate_models
    assert cpu.capabilities.generate_models == {"smollm2"}
    assert fpga.describe()["remote"] == "ray" and fpga.describe()["values"] == "cpu-reference"
    with pytest.raises(DeviceError, match="lacks resources"):
        make_ray_devices("fpga:emu,gpu", ["minilm"], tiny=True)


def test_engine_over_ray_devices_matches_the_local_models(cluster, models):
    texts = ["an embedding on the emulated board", "and another"]
    prompt = models.smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}],
                                                          add_generation_prompt=True, tokenize=True)

    async def go():
        async with Engine(_proxies(cluster)) as eng:
            e = eng.submit(Request("embed", "minilm", texts=texts))
            g = eng.submit(Request("generate", "smollm2", prompt=prompt, max_tokens=12, session="s1"))
            await asyncio.gather(e.wait(), g.wait())
            # a second step of the same session continues on the device holding its KV cache
            g2 = eng.submit(Request("generate", "smollm2", prompt=prompt + g.output + [2, 5], max_tokens=4,
                                    session="s1"))
            await g2.wait()
            return e, g, g2

    hits = ray.get(cluster["cpu"].actor.stats.remote())["prefix_hits"]
    e, g, g2 = asyncio.run(go())
    assert ray.get(cluster["cpu"].actor.stats.remote())["prefix_hits"] == hits + 1  # prefilled only the new tokens
    assert e.device == "fpga:emu" and g.device == "cpu"
    np.testing.assert_allclose(e.embeddings, models.minilm.encode(texts), atol=1e-5)
    ref = [t.id for t in s.generate(models.smollm2, models.smollm2_tokenizer, prompt, 12)]
    assert g.output == ref
    ref2 = [t.id for t in s.generate(models.smollm2, models.smollm2_tokenizer, prompt + g.output + [2, 5], 4)]
    assert g2.output == ref2


def test_a_lost_actor_is_a_device_failure_and_its_work_moves(cluster, models):
    # its own actor pair, so killing one leaves the shared ones alone: a null device and a CPU one
    host = ray.remote(DeviceHost)
    doomed = host.options(num_cpus=0).remote("cpu", ["minilm"], True, {"profile": False})
    tok = _local_tokenizers(["minilm"], tiny=True)
    victim = RayDevice.connect(doomed, tok, owned=True)
    victim.name = "doomed"
    survivor = RayDevice.connect(cluster["fpga:emu"].actor, tok)
    texts = ["rerouted sentence"]

    async def go():
        async with Engine([victim, survivor], policy="round_robin") as eng:
            ray.kill(doomed)
            reqs = [eng.submit(Request("embed", "minilm", texts=texts)) for _ in range(2)]
            for r in reqs:
                await r.wait()
            return reqs, dict(eng.stats)

    reqs, stats = asyncio.run(go())
    assert victim.health().value == "failed"
    assert all(r.finish_reason == "stop" and r.device == "fpga:emu" for r in reqs)
    assert any(r.devices == ["doomed", "fpga:emu"] for r in reqs) and stats["reroutes"] >= 1
    assert stats["lost"] == 0
    for r in reqs:
        np.testing.assert_allclose(r.embeddings, models.minilm.encode(texts), atol=1e-5)
