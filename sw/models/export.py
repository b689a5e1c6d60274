"""ONNX export helpers shared by the reference models: both torch exporters, a content-keyed
on-disk cache, checking, and running an exported file for comparison against PyTorch.

Exports are generated, never committed. They are cached under ``.cache/onnx/`` at the repository
root (git-ignored), or under ``$WEFT_CACHE_DIR/onnx`` when that variable is set, keyed by a hash of
everything that changes the file: exporter, opset, shapes, the weights' contents, the model's
source code, the export options and the torch/onnx versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import torch

__all__ = [
    "EXPORTERS",
    "SUPPORTED_OPSETS",
    "DEFAULT_OPSET",
    "ExportError",
    "cache_dir",
    "state_dict_fingerprint",
    "code_fingerprint",
    "export_onnx",
    "cached_export",
    "check_onnx",
    "run_onnx",
    "onnx_backend",
]

#: "dynamo": ``torch.onnx.export(..., dynamo=True)`` (torch.export based);
#: "torchscript": the legacy TorchScript exporter (``dynamo=False``).
EXPORTERS = ("dynamo", "torchscript")
#: Opsets accepted by :func:`export_onnx`. The TorchScript exporter stops at 20.
SUPPORTED_OPSETS = (17, 18, 19, 20, 21)
TORCHSCRIPT_MAX_OPSET = 20
_DYNAMO_MIN_OPSET = 18
DEFAULT_OPSET = 18

# Bump when the way files are written changes, so that old cache entries are not reused.
_CACHE_FORMAT = 1


class ExportError(RuntimeError):
    """An ONNX export could not be produced or failed its checks."""


def _repo_root() -> Path | None:
    here = Path(__file__).resolve()
    for parent in here.parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file():
            try:
                text = pyproject.read_text(encoding="utf-8")
            except OSError:
                return None
            return parent if 'name = "weft"' in text else None
    return None


def cache_dir() -> Path:
    """Folder for cached ONNX exports: ``$WEFT_CACHE_DIR/onnx`` if set, else ``<repo>/.cache/onnx``
    for a source checkout, else ``~/.cache/weft/onnx``."""
    env = os.environ.get("WEFT_CACHE_DIR")
    if env:
        return Path(env) / "onnx"
    root = _repo_root()
    if root is not None:
        return root / ".cache" / "onnx"
    return Path.home() / ".cache" / "weft" / "onnx"


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer of ``module`` (names, dtypes, shapes, bytes).

    Keyed on contents rather than on a file name, so a modified model never reuses a stale export.
    About 0.2 s for MiniLM's 90 MB.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _fix_reduce_attrs(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's version converter (1.23) moves Reduce* axes back to an attribute below opset 18 but
    keeps ``noop_with_empty_axes``, which only ReduceSum has there. With explicit non-empty axes
    the attribute changes nothing, so drop it; refuse anything else."""
    for node in model.graph.node:
        if not node.op_type.startswith("Reduce") or node.op_type == "ReduceSum":
            continue
        attrs = {a.name: a for a in node.attribute}
        if "noop_with_empty_axes" not in attrs:
            continue
        noop = onnx.helper.get_attribute_value(attrs["noop_with_empty_axes"])
        axes = onnx.helper.get_attribute_value(attrs["axes"]) if "axes" in attrs else []
        if noop and not axes:
            raise ExportError(f"cannot convert {node.op_type} node {node.name!r} with "
                              "noop_with_empty_axes=1 and no axes below opset 18")
        keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
        del node.attribute[:]
        node.attribute.extend(keep)
    return model


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Silence the exporters' progress and fallback chatter (raised errors still propagate)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def code_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the source files defining ``module``'s own (non-torch) submodule classes and
    this file, so that editing the model code invalidates cached exports."""
    files = {Path(__file__).resolve()}
    torch_dir = Path(torch.__file__).resolve().parent
    for cls in {type(m) for m in module.modules()}:
        try:
            src = inspect.getsourcefile(cls)
        except TypeError:
            continue
        if src is None:
            continue
        src_path = Path(src).resolve()
        if torch_dir not in src_path.parents:
            files.add(src_path)
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _validate(exporter: str, opset: int) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; expected one of {EXPORTERS}")
    if not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"unsupported ONNX opset {opset!r}; expected one of {SUPPORTED_OPSETS}"
        )
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise ValueError(
            f"the TorchScript exporter supports opsets up to {TORCHSCRIPT_MAX_OPSET}, "
            f"not {opset}; use exporter='dynamo'"
        )


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module(*args)`` with static shapes to one self-contained ``.onnx`` file at ``path``
    (weights inline, no external data), then run ``onnx.checker`` on it.

    The file is written to a temporary name and renamed into place, so a crash never leaves a
    half-written file behind.
    """
    _validate(exporter, opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    fd, tmp_name = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        sink = io.StringIO()
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                _quiet_loggers("torch.onnx", "onnxscript", "torch.export", "torch._dynamo"):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                # The dynamo exporter's lowest native opset is 18; below that it converts before
                # its optimiser has turned Reduce* axes into initializers, which fails for
                # ReduceSum/ReduceL2 and then silently keeps opset 18. Export at 18 and convert
                # the optimised graph here instead.
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    opset_version=max(opset, _DYNAMO_MIN_OPSET),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
                if program is None:  # pragma: no cover - defensive
                    raise ExportError("torch.onnx.export(dynamo=True) returned no program")
                proto = program.model_proto
                if opset < _DYNAMO_MIN_OPSET:
                    proto = _fix_reduce_attrs(onnx.version_converter.convert_version(proto, opset))
                onnx.save_model(proto, str(tmp), save_as_external_data=False)
            else:
                torch.onnx.export(
                    module,
                    args,
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    do_constant_folding=True,
                    verbose=False,
                )
        model = check_onnx(tmp)
        got_opset = _default_opset(model)
        if got_opset != opset:
            raise ExportError(f"{exporter} export produced opset {got_opset}, not the requested {opset}")
        got_inputs = [i.name for i in model.graph.input]
        got_outputs = [o.name for o in model.graph.output]
        if got_inputs != list(input_names) or got_outputs != list(output_names):
            raise ExportError(
                f"{exporter} export produced inputs {got_inputs} and outputs {got_outputs}; "
                f"expected {list(input_names)} and {list(output_names)}"
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{exporter} ONNX export (opset {opset}) failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cached_export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    *,
    name: str,
    key: Mapping[str, Any],
    input_names: Sequence[str],
    output_names: Sequence[str],
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    directory: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Return the cached export for (``name``, ``key``, exporter, opset, input shapes, weights,
    versions), exporting it first if missing or if ``force``.

    ``key`` holds the caller's own options (JSON-serialisable). The weights enter the key through
    :func:`state_dict_fingerprint`, so the same file name always means the same graph and weights.
    """
    _validate(exporter, opset)
    full_key = {
        "format": _CACHE_FORMAT,
        "name": name,
        "exporter": exporter,
        "opset": opset,
        "inputs": [[list(a.shape), str(a.dtype)] for a in args],
        "input_names": list(input_names),
        "output_names": list(output_names),
        "weights": state_dict_fingerprint(module),
        "code": code_fingerprint(module),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "options": dict(key),
    }
    digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(directory) if directory is not None else cache_dir()
    path = folder / f"{name}-{exporter}-op{opset}-{digest}.onnx"
    if path.is_file() and not force:
        return path
    export_onnx(
        module,
        args,
        path,
        input_names=input_names,
        output_names=output_names,
        exporter=exporter,
        opset=opset,
    )
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps(full_key, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def check_onnx(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load (if given a path) and check an ONNX model with ``onnx.checker`` (full check, with shape
    inference). Raises :class:`ExportError` naming the problem."""
    label = "<in-memory model>" if isinstance(model, onnx.ModelProto) else str(model)
    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"ONNX model {label} failed onnx.checker: {exc}") from exc
    return proto


def onnx_backend() -> str:
    """The backend :func:`run_onnx` uses by default: "onnxruntime" if it imports, else
    "reference" (``onnx.reference.ReferenceEvaluator``)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return "reference"
    return "onnxruntime"


def run_onnx(
    model: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    *,
    backend: str | None = None,
) -> list[np.ndarray]:
    """Run an ONNX file on numpy inputs and return its outputs in graph order.

    ``backend``: "onnxruntime" (CPU provider, all graph optimisations off, so the file's own
    graph is what runs), "reference" (onnx's ReferenceEvaluator, slow but dependency-free) or
    None for :func:`onnx_backend`.
    """
    backend = backend or onnx_backend()
    if backend == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        return list(sess.run(None, dict(feeds)))
    if backend == "reference":
        from onnx.reference import ReferenceEvaluator

        return list(ReferenceEvaluator(str(model)).run(None, dict(feeds)))
    raise ValueError(f"unknown ONNX backend {backend!r}; expected 'onnxruntime' or 'reference'")
