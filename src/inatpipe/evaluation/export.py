"""A checkpoint as a file that runs without this package: ONNX (for onnxruntime and other runtimes) or TorchScript
(for libtorch), with a dynamic batch size and the model's classes, image size, normalisation and temperature
inside. And parity: the exported model against the torch model on the same inputs, top-1 and logits.

ONNX goes through one of torch's two exporters (`evaluate.onnx_exporter`, `inatpipe export --exporter`):
- `torchscript`: the TorchScript-based exporter (`dynamo=False`), deprecated by torch since 2.9 but still shipped. It
  traces these plain feed-forward models in well under a second, where the other takes 5-10 s of CPU (torch.export's
  decompositions), which is most of an export stage on a small dataset.
- `dynamo`: torch's default exporter since 2.9, from torch.export's graph, with onnxscript.
- `auto` (the default): `torchscript` while the installed torch still has it, else `dynamo`.
Either way the parity below is measured on the file written, so a wrong graph never passes unnoticed.
TorchScript files are traced: torch.jit.script cannot compile the models' Python annotations.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inatpipe.atomic import atomic_open
from inatpipe.checkpoint import load_checkpoint
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.prepared import PreparedDataset, read_meta
from inatpipe.data.transforms import BatchResize
from inatpipe.errors import UserError
from inatpipe.evaluation.model_info import (
    INPUT_NAME,
    ONNX_SUFFIX,
    OUTPUT_NAME,
    TORCHSCRIPT_METADATA,
    TORCHSCRIPT_SUFFIX,
    ModelInfo,
)

FORMATS = {"onnx": ONNX_SUFFIX, "torchscript": TORCHSCRIPT_SUFFIX}
EXAMPLE_BATCH = 2  # traced and exported with two images, so that no size of 1 is taken for a constant
# torch warns that torch.jit and the TorchScript-based exporter are deprecated; the choice is made on purpose above.
DEPRECATED = ".*(torch.jit|TorchScript).*deprecated|The feature will be removed"


def example_input(info: ModelInfo, batch: int = EXAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
    """Normalised-looking inputs: standard normal pixels, the shape the model takes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, info.image_size, info.image_size, generator=generator)


ONNX_EXPORTERS = ("auto", "torchscript", "dynamo")
OPSET = 17  # the TorchScript-based exporter's; onnxruntime 1.14 and later run it


def _torchscript_onnx(model: nn.Module, info: ModelInfo):
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=DEPRECATED)
        torch.onnx.export(
            model.eval(),
            (example_input(info),),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
    return onnx.load_from_string(buffer.getvalue())


def _dynamo_onnx(model: nn.Module, info: ModelInfo):
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED)
        program = torch.onnx.export(
            model.eval(),
            (example_input(info),),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    return program.model_proto


def _check_exporter(exporter: str) -> None:
    if exporter not in ONNX_EXPORTERS:
        raise UserError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")


def onnx_bytes(model: nn.Module, info: ModelInfo, exporter: str = "auto") -> tuple[bytes, str]:
    """The model as an ONNX file (batch size free, `images` in, `logits` out) with `info` as metadata_props, and the
    exporter that wrote it (`auto`: the TorchScript-based one where this torch still has it, else dynamo)."""
    _check_exporter(exporter)
    proto = None
    if exporter in ("auto", "torchscript"):
        try:
            proto, exporter = _torchscript_onnx(model, info), "torchscript"
        except Exception as e:  # a torch without it (removed) or a model it cannot trace
            if exporter == "torchscript":
                raise UserError(
                    f"torch {torch.__version__}'s TorchScript-based ONNX exporter failed ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); use the dynamo exporter instead"
                ) from None
    if proto is None:
        proto, exporter = _dynamo_onnx(model, info), "dynamo"
    for key, value in info.metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"inatpipe {info.model_name}: {len(info.classes)} classes, {info.image_size} px input"
    return proto.SerializeToString(), exporter


def torchscript_bytes(model: nn.Module, info: ModelInfo) -> bytes:
    """The model traced to TorchScript (any batch size), with `info` in the archive's extra file."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=DEPRECATED)
        traced = torch.jit.trace(model.eval(), example_input(info))
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(info.metadata())})
    return buffer.getvalue()


def onnx_runner(model: bytes | Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Logits of a float32 input batch from an ONNX model under onnxruntime's CPU provider (fp32)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torchscript_runner(model: bytes) -> Callable[[np.ndarray], np.ndarray]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED)
        module = torch.jit.load(io.BytesIO(model), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


@dataclass(frozen=True)
class Parity:
    """The exported model against torch (both fp32, CPU) on the same inputs."""

    images: int
    top1_mismatches: int  # images whose most probable class differs
    max_abs_logit_diff: float
    torch_seconds: float
    exported_seconds: float

    def metrics(self) -> dict:
        return {
            "images": self.images,
            "top1_mismatches": self.top1_mismatches,
            "top1_agreement": (self.images - self.top1_mismatches) / max(self.images, 1),
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "torch_images_per_second": round(self.images / max(self.torch_seconds, 1e-9), 1),
            "onnxruntime_images_per_second": round(self.images / max(self.exported_seconds, 1e-9), 1),
        }

    def check(self, what: str) -> None:
        """Fail (one line) when the exported model's top-1 differs from torch's on any image."""
        if self.top1_mismatches:
            raise UserError(
                f"{what}: the exported model's top-1 class differs from torch's on {self.top1_mismatches} of "
                f"{self.images} images (largest logit difference {self.max_abs_logit_diff:.3g}); the export is not "
                "faithful, so it was not written"
            )


@torch.no_grad()
def measure_parity(
    model: nn.Module, exported: Callable[[np.ndarray], np.ndarray], batches: Iterable[torch.Tensor]
) -> Parity:
    """Run `model` (in fp32 on the CPU) and `exported` on every batch: top-1 agreement and the largest absolute
    logit difference."""
    model.eval()
    images = mismatches = 0
    worst, torch_seconds, exported_seconds = 0.0, 0.0, 0.0
    for i, x in enumerate(batches):
        x_np = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        if i == 0:  # the first calls pay one-off set-up (kernel choice, memory plans): keep it out of the timings
            model(x)
            exported(x_np)
        start = time.perf_counter()
        expected = model(x).float().numpy()
        torch_seconds += time.perf_counter() - start
        start = time.perf_counter()
        got = exported(x_np)
        exported_seconds += time.perf_counter() - start
        if got.shape != expected.shape:
            raise UserError(f"the exported model gives logits of shape {got.shape}, torch {expected.shape}")
        images += len(x)
        mismatches += int((got.argmax(1) != expected.argmax(1)).sum())
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()))
    return Parity(images, mismatches, worst, torch_seconds, exported_seconds)


def prepared_test_inputs(prepared: Path, meta: dict, batch_size: int) -> NormalizedLoader:
    """The prepared test images as the model's input, exactly as the evaluate stage feeds them (on the CPU)."""
    if read_meta(prepared)["classes"] != meta["classes"]:
        raise UserError(f"the checkpoint was trained on other classes than {prepared} holds; rerun `dvc repro`")
    dataset = PreparedDataset(prepared, "test", BatchResize(meta["image_size"]))
    norm = meta["normalization"]
    loader = make_loader(dataset, batch_size)
    return NormalizedLoader(loader, norm["mean"], norm["std"], torch.device("cpu"))


def _inputs_only(loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterable[torch.Tensor]:
    return (x for x, _ in loader)


def default_out(checkpoint: Path, fmt: str) -> Path:
    return Path(checkpoint).with_suffix(FORMATS[fmt])


def _check_out(out: Path, fmt: str) -> None:
    """Fail before the export (seconds of work) when `out` can't be the file asked for."""
    if out.suffix.lower() != FORMATS[fmt]:
        raise UserError(f"--out {out}: a {fmt} file must end in {FORMATS[fmt]} (predict tells formats by suffix)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path")
    folder = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"can't write {out}: {folder} is not a writable folder; choose another --out")


def write_bytes(out: Path, data: bytes) -> None:
    try:
        with atomic_open(out, "wb") as f:
            f.write(data)
    except OSError as e:
        raise UserError(f"can't write {out} ({e.strerror or e}); choose another --out") from None


@dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    size_bytes: int
    parity: Parity  # `inatpipe export`: on random inputs (the file alone); the stage: on every test image
    exporter: str  # torchscript or dynamo (ONNX), traced (TorchScript)


def export_checkpoint(checkpoint: Path, fmt: str, out: Path | None = None, exporter: str = "auto") -> Exported:
    """`inatpipe export`: the checkpoint as an ONNX or TorchScript file (default: beside it, .onnx or .ts), checked
    against torch on random inputs before it is written."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_exporter(exporter)
    out = Path(out) if out is not None else default_out(checkpoint, fmt)
    _check_out(out, fmt)
    model, meta = load_checkpoint(checkpoint, "cpu")
    info = ModelInfo.of_checkpoint(meta)
    if fmt == "onnx":
        data, exporter = onnx_bytes(model, info, exporter)
        runner = onnx_runner(data)
    else:
        data, exporter = torchscript_bytes(model, info), "traced"
        runner = torchscript_runner(data)
    parity = measure_parity(model, runner, [example_input(info, batch=8, seed=1)])
    parity.check(f"export of {checkpoint}")
    write_bytes(out, data)
    return Exported(out, fmt, len(data), parity, exporter)


def export_with_parity(
    checkpoint: Path, out: Path, prepared: Path, batch_size: int, threads: int | None = None, exporter: str = "auto"
) -> Exported:
    """The export stage's work: `checkpoint` as ONNX, run by onnxruntime and by torch on every prepared test image.
    The file is written to `out` only when top-1 agrees on every image; the stage records the parity, then
    `check`s it."""
    model, meta = load_checkpoint(checkpoint, "cpu")
    data, exporter = onnx_bytes(model, ModelInfo.of_checkpoint(meta), exporter)
    parity = measure_parity(
        model, onnx_runner(data, threads), _inputs_only(prepared_test_inputs(prepared, meta, batch_size))
    )
    if not parity.top1_mismatches:
        write_bytes(out, data)
    return Exported(out, "onnx", len(data), parity, exporter)
