"""The training loop, checkpoints and evaluation metrics, on real images from disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inatpipe.checkpoint import ModelSpec, load_checkpoint, save_checkpoint, spec_of
from inatpipe.data.index import scan_folder
from inatpipe.data.prepared import prepare
from inatpipe.data.transforms import BatchResize
from inatpipe.errors import UserError
from inatpipe.evaluation.metrics import Predictions, classification_metrics, evaluate_checkpoint
from inatpipe.models import build_model
from inatpipe.runtime import choose_device, seed_everything
from inatpipe.training.loop import EpochMetrics, fit
from inatpipe.training.precision import autocast, emulated_bf16_warning, native_bf16, resolve_precision

from .conftest import MEAN, ROOT, STD, folder_loader

CONFIG = {"image_size": 16, "num_filters": (8, 16), "dense_neurons": 32, "dropout": 0.0}
CLASSES = ["cat", "dog", "owl"]
SPEC = ModelSpec("flexible_cnn", CONFIG, CLASSES, 16, MEAN, STD)


def run_fit(data: Path, seed: int, epochs: int = 3, augment: bool = True) -> list[EpochMetrics]:
    generator = seed_everything(seed)
    train = folder_loader(data / "train", CLASSES, shuffle=True, generator=generator, augment=augment)
    val = folder_loader(data / "val", CLASSES)
    model = build_model("flexible_cnn", len(CLASSES), CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return list(fit(model, optimizer, train, val, epochs, torch.device("cpu")))


def test_fit_yields_one_result_per_epoch_and_learns(dataset: Path):
    history = run_fit(dataset, seed=0, epochs=6)
    assert [m.epoch for m in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].val_accuracy >= 0.9  # three colour-coded classes: chance is 1/3


def test_same_seed_same_metrics_other_seed_other_metrics(dataset: Path):
    def numbers(history):
        return [(m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy) for m in history]

    assert numbers(run_fit(dataset, seed=1)) == numbers(run_fit(dataset, seed=1))
    assert numbers(run_fit(dataset, seed=1)) != numbers(run_fit(dataset, seed=2))


def test_checkpoint_rebuilds_the_model_with_its_metadata(tmp_path: Path, dataset: Path):
    model = build_model("flexible_cnn", 3, CONFIG).eval()
    path = tmp_path / "models" / "m.pt"
    save_checkpoint(path, SPEC, model.state_dict(), extra={"epoch": 2})
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary file left beside it
    loaded, meta = load_checkpoint(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["classes"] == CLASSES and meta["image_size"] == 16 and meta["normalization"]["std"] == STD
    assert meta["extra"]["epoch"] == 2 and spec_of(meta) == SPEC

    prepare({"test": scan_folder(dataset / "val")}, CLASSES, 16, tmp_path / "prepared")
    metrics, pred, _ = evaluate_checkpoint(path, tmp_path / "prepared", 5, torch.device("cpu"))
    assert len(pred.targets) == 12 and 0 <= metrics["accuracy"] <= 1 and metrics["infer_images_per_second"] > 0
    # The same images through the model by hand: the loader feeds the prepared images, resized and normalised.
    images = torch.from_numpy(np.load(tmp_path / "prepared" / "test.npy")).permute(0, 3, 1, 2)
    x = (BatchResize(16)(images).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(pred.logits, model(x).double(), atol=1e-5, rtol=1e-5)


def test_bad_checkpoints_are_clear_errors(tmp_path: Path):
    with pytest.raises(UserError, match="checkpoint .*missing.pt not found; run `dvc repro`"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="junk.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not an inatpipe checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_classification_metrics_match_a_worked_example():
    # targets 0 0 1 1 2 2; predictions 0 1 1 1 2 0
    logits = torch.full((6, 3), -5.0, dtype=torch.float64)
    for row, cls in enumerate([0, 1, 1, 1, 2, 0]):
        logits[row, cls] = 5.0
    m = classification_metrics(Predictions(np.array([0, 0, 1, 1, 2, 2]), logits, 1.0), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 1, 1, 2, 2])).item()
    )


def test_macro_f1_ignores_a_class_absent_from_the_test_set():
    logits = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0]], dtype=torch.float64)
    m = classification_metrics(Predictions(np.array([0, 1]), logits, 1.0), ["a", "b", "c"])
    assert m["macro_f1"] == 1.0 and m["per_class"]["c"]["support"] == 0


def test_device_choice():
    # What `auto` must pick, read off torch independently: CUDA, else Apple's MPS, else the CPU.
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    assert choose_device("auto") == torch.device(expected)
    assert choose_device("cpu") == torch.device("cpu")
    for absent in [d for d, there in (("cuda", torch.cuda.is_available()), ("mps", mps)) if not there]:
        with pytest.raises(UserError, match=f"device '{absent}' is not available on this machine"):
            choose_device(absent)


@pytest.mark.parametrize(
    ("precision", "channels_last"), [("bf16", False), ("bf16", True), ("fp32", True), ("fp16", False)]
)
def test_mixed_precision_and_channels_last_train_with_finite_losses(dataset: Path, precision, channels_last):
    seed_everything(0)
    train = folder_loader(dataset / "train", CLASSES, shuffle=True)
    val = folder_loader(dataset / "val", CLASSES)
    model = build_model("flexible_cnn", len(CLASSES), CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = list(
        fit(model, optimizer, train, val, 3, torch.device("cpu"), precision=precision, channels_last=channels_last)
    )
    for m in history:
        assert all(np.isfinite([m.train_loss, m.val_loss]))
    assert history[-1].train_loss < history[0].train_loss
    conv = model.features[0].weight
    assert conv.dtype == torch.float32  # autocast computes in low precision; the weights stay fp32
    assert conv.is_contiguous(memory_format=torch.channels_last) == (channels_last and conv.shape[-1] > 1)


def cpu_has_native_bf16() -> bool:
    """Read off the processor's own feature flags, independently of torch: AVX-512 BF16 or AMX tiles."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to read the CPU's features from (not Linux)")
    flags = set(cpuinfo.read_text().split())
    return bool({"avx512_bf16", "amx_tile"} & flags)


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively():
    cpu = torch.device("cpu")
    for setting in ("fp32", "bf16", "fp16"):
        assert resolve_precision(cpu, setting) == setting  # an explicit setting is kept as written
    assert native_bf16(cpu) == cpu_has_native_bf16()
    auto = resolve_precision(cpu, "auto")
    assert auto == ("bf16" if cpu_has_native_bf16() else "fp32")
    with autocast(cpu, "auto"):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == (torch.bfloat16 if auto == "bf16" else torch.float32)
    assert resolve_precision(torch.device("mps"), "auto") == "fp32"


def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_warned_about_in_one_line():
    """On a CPU without AVX-512 BF16 or AMX (read off /proc/cpuinfo), `precision: bf16` gets a line saying it is
    emulated and that `auto` means fp32 there; where the CPU has them, and for auto or fp32, nothing is said."""
    cpu = torch.device("cpu")
    line = emulated_bf16_warning(cpu, "bf16", "train.precision")
    if cpu_has_native_bf16():
        assert line is None
    else:
        assert line == (
            "warning: train.precision: bf16 on this cpu (no AVX-512 BF16 or AMX) is emulated and runs several times "
            "slower than fp32; set train.precision: auto to use fp32 here"
        )
    assert emulated_bf16_warning(cpu, "auto", "resnet.precision") is None
    assert emulated_bf16_warning(cpu, "fp32", "resnet.precision") is None


def test_compile_without_a_cxx_compiler_is_a_one_line_error(tmp_path: Path):
    """Inductor compiles at the first call: with no C++ compiler (CXX names none, and an empty cache holds no code
    compiled before), the run stops there with one line that says how to fix it."""
    code = (
        "import torch\n"
        "from inatpipe.errors import exit_on_user_error\n"
        "from inatpipe.training.loop import fit\n"
        "model = torch.nn.Linear(4, 2)\n"
        "batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "run = fit(model, optimizer, batches, batches, 1, torch.device('cpu'), compile=True)\n"
        "exit_on_user_error(lambda: list(run))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "CXX": "no-such-c++-compiler",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train.compile / resnet.compile: true needs a working C++ compiler for torch.compile")
    assert "(InvalidCxxCompiler" in last and "no-such-c++-compiler" in last and last.endswith("; set it to false")
