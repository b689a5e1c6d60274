"""weft.sw.models: reference models in plain PyTorch with real weights, and their ONNX export.

- :mod:`weft.sw.models.minilm`: all-MiniLM-L6-v2 (BERT encoder, sentence embeddings).
- :mod:`weft.sw.models.smollm2`: SmolLM2-135M-Instruct (Llama-style decoder, GGUF weights,
  tokenizer, chat template, KV-cached generation, prefill/decode ONNX graphs).
- :mod:`weft.sw.models.export`: ONNX export (dynamo and TorchScript exporters), cache, checks.

Submodules are imported on demand, so importing this package stays cheap.
"""

__all__ = ["minilm", "smollm2", "export"]
