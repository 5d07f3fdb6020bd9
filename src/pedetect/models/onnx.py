"""ONNX export of a fold's models, and ONNX Runtime models with the torch models' interface.

``pedetect export`` writes ``MODEL_DIR/onnx/fold<k>/`` (:mod:`pedetect.models.layout`):

- ``cnn.onnx``: the slice CNN's :meth:`~pedetect.models.slice_classifier.SliceClassifier.embed_with_map`,
  uint8 pixels ``(B, C, S, S)`` → embedding ``(B, D)``, slice logit ``(B,)`` and activation map
  ``(B, h, w)`` (where the CNN finds embolus: clot candidates), any batch size.
  Exported with torch.export (``dynamo=True``), the exporter PyTorch maintains.
- ``cnn_int8.onnx``: the same CNN with int8 weights and activations (static quantization in the QDQ
  format, per-channel weights, ranges calibrated on real slices). Only the CNN is quantized.
- ``seq.onnx``: the sequence head on one series, embeddings ``(1, T, D)`` and CNN logits ``(1, T)``
  → slice logits ``(1, T)`` and exam logits ``(1, 9)``, any length. A recurrent head is exported with
  the TorchScript exporter: it writes ONNX's own GRU/LSTM operator, where torch.export unrolls the
  recurrence over the example's length (a head that then takes 8 slices and no other number).

:class:`OnnxSliceClassifier` and :class:`OnnxSequenceHead` run those files and answer the calls
``predict`` makes of the torch models (``embed``, ``predict_series``), so one code path batches
slices and pairs heads with CNNs whatever the runtime.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pedetect.io import atomic_path, file_sha256
from pedetect.models.layout import EXPORT_FILE, ONNX_DIR, WEIGHTS_FILE, cnn_dir, onnx_dir, seq_dir

if TYPE_CHECKING:
    from pedetect.models.sequence import SequenceHead
    from pedetect.models.slice_classifier import SliceClassifier

CNN_FILE = "cnn.onnx"
CNN_INT8_FILE = "cnn_int8.onnx"
SEQ_FILE = "seq.onnx"
# 17: the opset of the TorchScript exporter's GRU/LSTM; 18: torch.export's default and lowest.
SEQ_OPSET = 17
CNN_OPSET = 18
# Slices per ONNX Runtime call. Its CPU kernels gain nothing from larger batches, and its memory
# arena keeps the largest run's activations: rexnet_200 at 512 px, 64 slices, fp32: 32 at a time
# 21.9 s and 9.6 GB peak, 8 at a time 18.4 s and 2.9 GB; int8: 12.4 s, 3.7 GB against 11.8 s, 1.4 GB.
RUN_BATCH = 8


class _EmbedWithMap(nn.Module):
    """The CNN as stage 2 and ``predict`` call it: pixels → (embedding, slice logit, activation map)."""

    def __init__(self, model: SliceClassifier):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.embed_with_map(pixels)


class _OneSeries(nn.Module):
    """The head on one whole series (no padding: every position a slice)."""

    def __init__(self, head: SequenceHead):
        super().__init__()
        self.head = head

    def forward(self, embeddings: torch.Tensor, cnn_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(embeddings, None, cnn_logits)


def export_slice_classifier(model: SliceClassifier, path: str | Path, *, channels: int, image_size: int) -> None:
    """``model`` (eval mode, on the CPU) as ONNX at ``path`` (atomically), batch size dynamic."""
    model = model.eval().cpu()
    example = torch.randint(0, 256, (2, channels, image_size, image_size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notes, not ours
        _export_dynamo(
            _EmbedWithMap(model),
            (example,),
            tmp,
            dynamic_shapes={"pixels": {0: batch}},
            input_names=["pixels"],
            output_names=["embedding", "logit", "activation"],
        )


def _export_dynamo(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, **names_and_shapes: Any) -> None:
    """``module`` through torch.export into one self-contained ONNX file at ``path`` (weights inside,
    at :data:`CNN_OPSET`)."""
    program = torch.onnx.export(
        module, example, opset_version=CNN_OPSET, dynamo=True, external_data=False, verbose=False, **names_and_shapes
    )
    assert program is not None  # dynamo=True: the exporter returns the program
    program.save(str(path))


def _register_sinh() -> None:
    """The TorchScript exporter lacks aten::sinh (the conditional head's log(1 − p) uses it);
    ONNX has had Sinh since opset 9."""
    torch.onnx.register_custom_op_symbolic("aten::sinh", lambda g, x: g.op("Sinh", x), 9)


def export_sequence_head(head: SequenceHead, path: str | Path) -> None:
    """``head`` (eval mode, on the CPU) as ONNX at ``path`` (atomically), one series of any length.

    Recurrent heads go through the TorchScript exporter (ONNX's GRU/LSTM operators keep the length
    free; torch.export would unroll the recurrence over the example's length), transformers through
    torch.export (the TorchScript exporter lacks PyTorch's fused encoder layer)."""
    head = head.eval().cpu()
    if head.fixed_length is not None and getattr(head, "resize", "all") == "longer":
        # Resizing only series longer than fixed_length is a branch on the length, which a traced
        # graph would fix at the example's: the exported head would be wrong for the other side.
        raise ValueError(
            "seq.resize: longer (resize only long series) is not exportable to ONNX; predict with --runtime torch"
        )
    example = (torch.randn(1, 8, head.embedding_dim), torch.randn(1, 8))
    input_names, output_names = ["embeddings", "cnn_logits"], ["slice_logits", "exam_logits"]
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if head.encoder_kind == "transformer":
            length = torch.export.Dim("length", min=1, max=4096)
            _export_dynamo(
                _OneSeries(head).eval(),
                example,
                tmp,
                dynamic_shapes={"embeddings": {1: length}, "cnn_logits": {1: length}},
                input_names=input_names,
                output_names=output_names,
            )
            return
        _register_sinh()
        torch.onnx.export(
            _OneSeries(head).eval(),
            example,
            str(tmp),
            opset_version=SEQ_OPSET,
            dynamo=False,
            dynamic_axes={"embeddings": {1: "length"}, "cnn_logits": {1: "length"}, "slice_logits": {1: "length"}},
            input_names=input_names,
            output_names=output_names,
        )


def onnx_session(path: str | Path, *, threads: int | None = None, keep_memory: bool = True):
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (None: its default,
    every physical core). ``keep_memory=False``: no memory arena, so the session holds no more than
    its current run (several sessions side by side, as the export's check runs them)."""
    import onnxruntime as ort  # only for the onnx runtimes: PyTorch inference imports this module without it

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = keep_memory
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are not the user's business
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxSliceClassifier:
    """A fold's exported CNN (``cnn.onnx`` or ``cnn_int8.onnx``): ``embed`` and ``embed_with_map`` as
    the torch model's (an export made before the activation map has only ``embed``: ``has_map`` False)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, keep_memory: bool = True):
        self.path = Path(path)
        self.session = onnx_session(path, threads=threads, keep_memory=keep_memory)
        outputs = self.session.get_outputs()
        shape = outputs[0].shape
        if not isinstance(shape[-1], int):
            raise ValueError(f"{path}: the embedding width is not fixed in the graph ({shape})")
        self.embedding_dim = int(shape[-1])
        self.has_map = len(outputs) >= 3

    def eval(self) -> OnnxSliceClassifier:
        return self

    def _run(self, pixels: torch.Tensor) -> list[np.ndarray]:
        """Every output of the graph for ``(B, C, S, S)`` pixels, :data:`RUN_BATCH` slices at a time."""
        array = (
            pixels.cpu().numpy()
            if pixels.dtype == torch.uint8
            else pixels.cpu().round().clamp(0, 255).to(torch.uint8).numpy()
        )
        runs = [
            self.session.run(None, {"pixels": np.ascontiguousarray(array[i : i + RUN_BATCH])})
            for i in range(0, len(array), RUN_BATCH)
        ]
        if not runs:
            return [
                np.zeros((0, self.embedding_dim), np.float32),
                np.zeros(0, np.float32),
                np.zeros((0, 1, 1), np.float32),
            ]
        return [np.concatenate(parts) for parts in zip(*runs)]

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, S, S)`` uint8 → ``(embedding (B, D), slice logit (B,))`` float32 tensors."""
        embedding, logit = self._run(pixels)[:2]
        return torch.from_numpy(embedding), torch.from_numpy(logit)

    def embed_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`embed` and the activation map ``(B, h, w)``."""
        if not self.has_map:
            raise ValueError(
                f"{self.path} has no activation map (exported by an older pedetect): run pedetect export again"
            )
        embedding, logit, activation = self._run(pixels)[:3]
        return torch.from_numpy(embedding), torch.from_numpy(logit), torch.from_numpy(activation)


class OnnxSequenceHead:
    """A fold's exported sequence head (``seq.onnx``): ``predict_series`` as the torch head's."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.path = Path(path)
        self.session = onnx_session(path, threads=threads)
        width = self.session.get_inputs()[0].shape[-1]
        if not isinstance(width, int):
            raise ValueError(f"{path}: the embedding width is not fixed in the graph")
        self.embedding_dim = int(width)

    def predict_series(self, embeddings: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slice logits ``(N,)`` and exam logits ``(9,)`` of one series, float32."""
        if len(embeddings) == 0:
            raise ValueError("a series without slices has no sequence prediction")
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings are {embeddings.shape[1]} wide; this head takes {self.embedding_dim}")
        feeds = {
            "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32)[None],
            "cnn_logits": np.ascontiguousarray(logits, dtype=np.float32)[None],
        }
        names = {i.name for i in self.session.get_inputs()}
        slice_logits, exam_logits = self.session.run(None, {k: v for k, v in feeds.items() if k in names})
        return slice_logits[0], exam_logits[0]


class _Batches:
    """onnxruntime's calibration reader over batches of uint8 pixels."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"pixels": np.ascontiguousarray(batch, dtype=np.uint8)}


def quantize_slice_classifier(fp32_path: str | Path, int8_path: str | Path, batches: Iterable[np.ndarray]) -> None:
    """Static int8 quantization of an exported CNN (QDQ format: ONNX Runtime fuses each
    dequantize–op–quantize into an integer kernel), per-channel int8 weights, uint8 activations
    whose ranges are the minima and maxima seen on ``batches`` (real slices, uint8 ``(B, C, S, S)``)."""
    # onnxruntime's quantizer only for export --int8
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="pedetect-quant-") as scratch, atomic_path(int8_path) as tmp:
        prepared = Path(scratch) / "prepared.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Shape inference and graph clean-up first: what onnxruntime asks for before quantizing.
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(tmp),
                _Batches(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibTensorRangeSymmetric": False},
            )


RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
_RUNTIME_CNN = {"onnx": CNN_FILE, "onnx-int8": CNN_INT8_FILE}


def read_export(model_dir: str | Path) -> dict | None:
    """``MODEL_DIR/onnx/export.json`` when it exists and every fold's files were made from the
    weights the bundle holds now (a retrained fold makes the export stale: None)."""
    path = Path(model_dir) / ONNX_DIR / EXPORT_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    for fold, entry in record.get("folds", {}).items():
        k = int(fold)
        if not all((onnx_dir(model_dir, k) / name).is_file() for name in entry.get("files", ())):
            return None
        if entry.get("cnn_sha256") != file_sha256(cnn_dir(model_dir, k) / WEIGHTS_FILE):
            return None
        if entry.get("seq_sha256") != file_sha256(seq_dir(model_dir, k) / WEIGHTS_FILE):
            return None
    return record


def choose_runtime(model_dir: str | Path, requested: str, folds: list[int], *, device: str = "cpu") -> tuple[str, str]:
    """The runtime ``predict`` uses for a bundle, and why. ``auto``: PyTorch on a GPU; on a CPU the
    fastest, in the export's own timing, of PyTorch and the runtimes the export found exact enough.
    A runtime asked for by name must exist for every fold (else ``ValueError`` naming the command
    that makes it)."""
    if requested not in RUNTIMES:
        raise ValueError(f"unknown runtime {requested!r}; choose one of {', '.join(RUNTIMES)}")
    if requested == "torch":
        return "torch", "asked for"
    record = read_export(model_dir)
    available = []
    if record is not None:
        exported = [set(record["folds"].get(str(k), {}).get("files", ())) for k in folds]
        available = [
            name
            for name, file in _RUNTIME_CNN.items()
            if all(file in files and SEQ_FILE in files for files in exported)
        ]
    if requested != "auto":
        if device != "cpu":
            raise ValueError(f"runtime {requested} runs on the CPU; use --device cpu (or --runtime torch on {device})")
        if requested not in available:
            state = (
                "has no export"
                if record is None
                else "has no " + requested + " export of every fold made from its current weights"
            )
            flag = " --int8" if requested == "onnx-int8" else ""
            raise ValueError(
                f"{model_dir} {state}: run pedetect export {model_dir} --store STORE{flag} (or use --runtime torch)"
            )
        return requested, "asked for"
    if device != "cpu":
        return "torch", f"on {device}"
    if record is None:
        return "torch", "no ONNX export (pedetect export)"
    exact = [name for name in available if record["default_ok"].get(name)]
    if not exact:
        return "torch", "no exported runtime passed its accuracy check (" + "; ".join(
            f"{k}: {v}" for k, v in record["why"].items()
        ) + ")"
    speed = {name: record["check"].get(name, {}).get("seconds_per_100_slices") for name in (*exact, "torch")}
    timed = {name: value for name, value in speed.items() if value}
    fastest = min(timed, key=lambda name: timed[name]) if timed else exact[0]
    if fastest == "torch":
        return "torch", f"faster than {', '.join(exact)} in the export's timing ({_speeds(timed)})"
    return fastest, f"{record['why'][fastest]}; fastest in the export's timing ({_speeds(timed)})"


def _speeds(timed: dict[str, float]) -> str:
    return ", ".join(
        f"{name} {value:.2g} s per 100 slices" for name, value in sorted(timed.items(), key=lambda item: item[1])
    )


def load_runtime_fold(model_dir: str | Path, fold: int, runtime: str, *, threads: int | None = None):
    """Fold ``fold``'s (CNN, head) in an exported runtime (``onnx`` or ``onnx-int8``)."""
    folder = onnx_dir(model_dir, fold)
    return OnnxSliceClassifier(folder / _RUNTIME_CNN[runtime], threads=threads), OnnxSequenceHead(
        folder / SEQ_FILE, threads=threads
    )
