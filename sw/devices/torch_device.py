"""CPU and GPU devices: the PyTorch reference models (MiniLM embeddings, SmolLM2 generation).

``TorchDevice(models, "cpu")`` runs on the host; ``TorchDevice(models, "cuda")`` copies the
models to the GPU (``cuda_available()`` says whether one is there; constructing a GPU device
without one raises :class:`DeviceError`).

Generation keeps one :class:`~weft.sw.models.smollm2.KVCache` per sequence. The reference
model's cache has one length per batch, so a decode iteration runs its sequences one after
another (the cost model is profiled the same way); batching is still continuous: sequences
join and leave the running batch at every iteration.

The cost model is profiled at start-up over batch sizes and lengths and cached under
``.cache/weft/profiles/`` (key: device kind and name, model fingerprint, torch version, threads).
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict

import numpy as np
import torch

from .base import Capabilities, Device, DeviceError, MemoryInfo, ModelInfo, Seq, sample_token
from .cost import LinearCostModel, load_or_profile
from .models import ModelSet

__all__ = ["TorchDevice", "cuda_available"]


def cuda_available() -> bool:
    return torch.cuda.is_available()


class TorchDevice(Device):
    def __init__(self, models: ModelSet, device: str = "cpu", *, name: str | None = None,
                 kv_capacity_tokens: int | None = None, max_decode_batch: int = 16,
                 max_embed_batch: int = 32, profile: bool = True, refresh_profile: bool = False,
                 cost: LinearCostModel | None = None) -> None:
        if device.startswith("cuda") and not cuda_available():
            raise DeviceError("no CUDA GPU is available for a GPU device")
        self.torch_device = torch.device(device)
        self.kind = "gpu" if self.torch_device.type == "cuda" else "cpu"
        super().__init__(name or self.kind)
        on_gpu = self.kind == "gpu"
        self.minilm = None
        if models.minilm is not None:
            self.minilm = copy.copy(models.minilm)
            if on_gpu:
                self.minilm.model = copy.deepcopy(models.minilm.model).to(self.torch_device)
        self.lm = None
        if models.smollm2 is not None:
            self.lm = copy.deepcopy(models.smollm2).to(self.torch_device) if on_gpu else models.smollm2
        self.lm_tokenizer = models.smollm2_tokenizer
        self.models = models
        self._caps = Capabilities(
            embed_models=frozenset({"minilm"} if self.minilm is not None else ()),
            generate_models=frozenset({"smollm2"} if self.lm is not None else ()),
            max_embed_batch=max_embed_batch, max_decode_batch=max_decode_batch)
        self._kv: dict[str, tuple[list[int], object]] = {}  # seq_id -> (ids in cache, KVCache)
        self._pins: OrderedDict[str, tuple[list[int], object]] = OrderedDict()  # session -> same
        self._bytes_per_token = 0
        if self.lm is not None:
            c = self.lm.cfg
            self._bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
        self._kv_capacity = kv_capacity_tokens if kv_capacity_tokens is not None \
            else self._default_kv_capacity()
        self._cost = cost
        self.profile_from_cache = None
        if self._cost is None:
            self._cost = self._profile(refresh_profile) if profile else LinearCostModel(
                {"embed": (1e-3, 1e-6, 0.0), "prefill": (1e-3, 1e-4, 0.0), "decode": (5e-3, 5e-3, 0.0)})

    # ------------------------------------------------------------ description
    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def cost(self) -> LinearCostModel:
        return self._cost

    def model_info(self, model: str) -> ModelInfo:
        if model == "minilm" and self.minilm is not None:
            return ModelInfo("minilm", "embed", self.minilm.max_length, dim=self.minilm.config.hidden_size,
                             tokenizer=self.minilm.tokenizer,
                             description="all-MiniLM-L6-v2 (random tiny)" if self.models.tiny
                             else "all-MiniLM-L6-v2")
        if model == "smollm2" and self.lm is not None:
            stop = self.lm_tokenizer.stop_ids if self.lm_tokenizer is not None \
                else frozenset({self.lm.cfg.eos_token_id})
            return ModelInfo("smollm2", "generate", self.lm.cfg.max_position_embeddings,
                             stop_ids=stop, tokenizer=self.lm_tokenizer,
                             description="SmolLM2-135M-Instruct (random tiny)" if self.models.tiny
                             else "SmolLM2-135M-Instruct")
        raise DeviceError(f"device {self.name} does not serve {model!r}")

    def _default_kv_capacity(self) -> int:
        if self.lm is None:
            return 0
        if self.kind == "gpu":
            free, _ = torch.cuda.mem_get_info(self.torch_device)
            return int(0.5 * free // self._bytes_per_token)
        return int((2 << 30) // self._bytes_per_token)  # 2 GiB of host memory for KV

    def memory(self) -> MemoryInfo:
        used = sum(len(ids) for ids, _ in self._kv.values())
        pinned = sum(len(ids) for ids, _ in self._pins.values())
        return MemoryInfo(self._kv_capacity, used, pinned, self._bytes_per_token)

    # ------------------------------------------------------------ execution
    def _embed(self, model: str, texts: list[str]) -> np.ndarray:
        enc = self.minilm.tokenize(texts)
        return self._embed_ids(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask),
                               torch.from_numpy(enc.token_type_ids))

    @torch.inference_mode()
    def _embed_ids(self, ids, mask, types=None) -> np.ndarray:
        from weft.sw.models.minilm import mean_pool

        dev = self.torch_device
        ids, mask = ids.to(dev), mask.to(dev)
        types = types.to(dev) if types is not None else torch.zeros_like(ids)
        h = self.minilm.model(ids, mask, types)
        return mean_pool(h, mask, True).float().cpu().numpy()

    @torch.inference_mode()
    def _step(self, model: str, prefill: list[Seq], decode: list[Seq]) -> dict[str, int]:
        out: dict[str, int] = {}
        dev = self.torch_device
        for seq in prefill:
            ids = list(seq.prompt) + list(seq.output)  # a requeued sequence recomputes its output
            past, cache = self._reuse(seq, ids)
            x = torch.tensor([ids[past:]], dtype=torch.long, device=dev)
            logits, cache = self.lm.forward(x, cache, last_only=True)
            self._kv[seq.seq_id] = (ids, cache)
            out[seq.seq_id] = sample_token(logits[0, -1], seq)
        for seq in decode:
            ids, cache = self._kv[seq.seq_id]
            tok = seq.output[-1]
            logits, cache = self.lm.decode_step(torch.tensor([tok], device=dev), cache)
            self._kv[seq.seq_id] = (ids + [tok], cache)
            out[seq.seq_id] = sample_token(logits[0], seq)
        return out

    def _reuse(self, seq: Seq, ids: list[int]):
        """A session's pinned cache whose tokens are a strict prefix of ``ids``: prefill only
        the rest (an agent's next step after a tool call)."""
        if seq.session is None or seq.session not in self._pins:
            return 0, None
        pids, cache = self._pins.pop(seq.session)
        n = len(pids)
        if n < len(ids) and ids[:n] == pids:
            self.prefix_hits = getattr(self, "prefix_hits", 0) + 1
            return n, cache
        return 0, None

    def free(self, seq_id: str) -> None:
        self._kv.pop(seq_id, None)

    def pin(self, seq: Seq, session: str) -> int:
        entry = self._kv.pop(seq.seq_id, None)
        if entry is None:
            return 0
        self._pins[session] = entry
        self._pins.move_to_end(session)
        return len(entry[0])

    def unpin(self, session: str) -> None:
        self._pins.pop(session, None)

    # ------------------------------------------------------------ profiling
    def _profile(self, refresh: bool) -> LinearCostModel:
        fp = "-".join(f"{k}{v}" for k, v in sorted(self.models.fingerprints.items()))
        gpu = torch.cuda.get_device_name(self.torch_device).replace(" ", "_") if self.kind == "gpu" else ""
        key = f"{self.kind}{gpu}-{fp}-torch{torch.__version__}-t{torch.get_num_threads()}"
        model, cached = load_or_profile(key, self._measure, refresh=refresh)
        self.profile_from_cache = cached
        return model

    def _measure(self) -> list[tuple[str, dict, float]]:
        samples: list[tuple[str, dict, float]] = []

        def timed(fn, reps=2) -> float:
            fn()  # warm-up
            if self.kind == "gpu":
                torch.cuda.synchronize()
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                if self.kind == "gpu":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            return best

        if self.minilm is not None:
            limit = self.minilm.max_length
            vocab = self.minilm.config.vocab_size
            for b in (1, 4, 16):
                for t in sorted({min(8, limit), min(32, limit), min(128, limit)}):
                    ids = torch.randint(5, vocab, (b, t))
                    mask = torch.ones_like(ids)
                    s = timed(lambda: self._embed_ids(ids, mask))
                    samples.append(("embed", {"batch": b, "tokens": t}, s))
        if self.lm is not None:
            limit = self.lm.cfg.max_position_embeddings
            vocab = self.lm.cfg.vocab_size
            gen = torch.Generator().manual_seed(0)
            for t in sorted({min(8, limit // 2), min(64, limit // 2), min(192, limit // 2)}):
                prompt = torch.randint(3, vocab, (t,), generator=gen).tolist()
                seq = Seq("profile", "smollm2", prompt, 1)
                s = timed(lambda: self._step("smollm2", [seq], []))
                samples.append(("prefill", {"tokens": t}, s))
            for ctx in sorted({min(16, limit // 2), min(128, limit // 2)}):
                for b in (1, 4):
                    seqs = [Seq(f"profile{i}", "smollm2", torch.randint(3, vocab, (ctx,), generator=gen).tolist(), 8)
                            for i in range(b)]
                    self._step("smollm2", seqs, [])
                    for q in seqs:
                        q.output.append(5)
                    snapshot = dict(self._kv)

                    def one():
                        self._kv.update(snapshot)
                        self._step("smollm2", [], seqs)
                    s = timed(one)
                    samples.append(("decode", {"batch": b, "context": ctx}, s))
            self._kv.clear()
        return samples
