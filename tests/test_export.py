"""`inatpipe export` to ONNX and TorchScript, parity with torch, and `inatpipe predict` from an exported file: on a
checkpoint of a FlexibleCNN really trained on generated images (onnxruntime, onnx and torch are the real libraries;
the no-torch check runs a Python whose import system refuses torch)."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from inatpipe import torchfile
from inatpipe.checkpoint import load_checkpoint
from inatpipe.cli import main
from inatpipe.data import pixels
from inatpipe.data.index import scan_folder
from inatpipe.data.prepared import prepare
from inatpipe.errors import UserError, exit_on_user_error
from inatpipe.evaluation.export import measure_parity, onnx_runner, prepared_test_inputs
from inatpipe.evaluation.model_info import ModelInfo
from inatpipe.evaluation.predict import model_input
from inatpipe.evaluation.predictor import load_predictor

from .conftest import MEAN, STD, trained_checkpoint, write_image_folder
from .imports import SRC
from .test_predict_inspect import run_main

CONFIG = {"image_size": 16, "num_filters": (8, 16), "dense_neurons": 32, "dropout": 0.0}
CLASSES = ["cat", "dog", "owl"]
TEMPERATURE = 1.5  # as post-hoc temperature scaling stores it: a top-level key of the checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """FlexibleCNN trained for a few epochs on three colour-coded classes, saved as the pipeline saves it, with a
    calibration temperature."""
    path = trained_checkpoint(tmp_path_factory.mktemp("trained"), CLASSES, CONFIG)
    torchfile.save({**torchfile.load(path, what="checkpoint", fix=""), "temperature": TEMPERATURE}, path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    """The checkpoint exported by the command: ONNX beside it (the default path and exporter, auto: torchscript
    here), ONNX by the dynamo exporter and TorchScript to paths of their own."""
    folder = tmp_path_factory.mktemp("exported")
    out = {
        "onnx": checkpoint.with_suffix(".onnx"),
        "onnx-dynamo": folder / "dynamo.onnx",
        "torchscript": folder / "model.ts",
    }
    for name, path in out.items():
        args = ["export", "--model", str(checkpoint), "--format", name.split("-")[0]]
        if name != "onnx":
            args += ["--out", str(path)]
        if name == "onnx-dynamo":
            args += ["--exporter", "dynamo"]
        main(args)
        assert path.is_file()
    return out


def torch_logits(checkpoint: Path, x: torch.Tensor) -> np.ndarray:
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize(("name", "opset"), [("onnx", 17), ("onnx-dynamo", 18)])
def test_onnx_file_carries_the_metadata_and_takes_any_batch_size(
    checkpoint: Path, exported: dict[str, Path], name: str, opset: int
):
    """From either exporter (the TorchScript-based one writes opset 17; dynamo a newer one)."""
    proto = onnx.load(str(exported[name]))
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[""] >= opset
    props = {p.key: p.value for p in proto.metadata_props}
    info = ModelInfo.of_metadata(props, exported[name])
    assert info == ModelInfo("flexible_cnn", CLASSES, 16, MEAN, STD, TEMPERATURE)
    assert json.loads(props["classes"]) == CLASSES and json.loads(props["temperature"]) == TEMPERATURE
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")  # a named, free batch dimension

    session = onnxruntime.InferenceSession(str(exported[name]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_outputs()[0].name == "logits"
    for n in (1, 5):
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))
        got = session.run(None, {"images": x.numpy()})[0]
        expected = torch_logits(checkpoint, x)
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # loaded here as a user would
def test_torchscript_file_carries_the_metadata_and_takes_any_batch_size(checkpoint: Path, exported: dict[str, Path]):
    extra = {"inatpipe.json": ""}
    module = torch.jit.load(str(exported["torchscript"]), _extra_files=extra)
    info = ModelInfo.of_metadata(json.loads(extra["inatpipe.json"]), exported["torchscript"])
    assert info == ModelInfo("flexible_cnn", CLASSES, 16, MEAN, STD, TEMPERATURE)
    for n in (1, 5):
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(10 + n))
        with torch.no_grad():
            got = module(x).numpy()
        np.testing.assert_allclose(got, torch_logits(checkpoint, x), atol=1e-5, rtol=1e-5)


def test_a_checkpoint_without_temperature_exports_temperature_one():
    meta = {"model_name": "m", "classes": ["a"], "image_size": 8, "normalization": {"mean": [0.5] * 3, "std": [1] * 3}}
    info = ModelInfo.of_checkpoint(meta)
    assert info.temperature == 1.0
    assert ModelInfo.of_metadata(info.metadata(), Path("x.onnx")) == info
    with pytest.raises(UserError, match="temperature must be > 0"):
        ModelInfo.of_checkpoint({**meta, "temperature": 0.0})


@pytest.mark.parametrize(("side", "size"), [(19, 16), (37, 32), (256, 224), (73, 64), (147, 128), (300, 17), (10, 32)])
def test_numpy_model_input_equals_the_torch_one_bit_for_bit(side: int, size: int):
    """The ONNX path's resize and normalisation (numpy) against the checkpoint path's (torch), on random pixels:
    prepared squares of every size ratio the pipeline meets, and an upscale."""
    rng = np.random.default_rng(side)
    images = list(rng.integers(0, 256, size=(3, side, side, 3), dtype=np.uint8))
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
    meta = {"image_size": size, "normalization": {"mean": mean, "std": std}}
    expected = model_input(images, meta).numpy()
    got = pixels.model_input(images, size, mean, std)
    assert got.dtype == np.float32 and got.shape == (3, 3, size, size)
    assert np.array_equal(got, expected)


def predictions(csv_path: Path) -> dict[str, list[tuple[str, float]]]:
    with csv_path.open() as f:
        return {
            row["path"]: [(row[f"class_{r}"], float(row[f"probability_{r}"])) for r in (1, 2, 3)]
            for row in csv.DictReader(f)
        }


def test_predict_gives_the_same_from_the_checkpoint_onnx_and_torchscript(
    checkpoint: Path, exported: dict[str, Path], tmp_path: Path, capsys
):
    folder = write_image_folder(tmp_path / "new", per_class=4, seed=7, ext=".jpg")
    results = {}
    for name, model, extra in (
        ("pt", checkpoint, ["--precision", "fp32"]),
        ("onnx", exported["onnx"], []),
        ("ts", exported["torchscript"], []),
    ):
        out = tmp_path / f"{name}.csv"
        code, stdout, err = run_main(capsys, "predict", "--model", str(model), *extra, "--csv", str(out), str(folder))
        assert code == 0, err
        assert len(stdout.strip().splitlines()) == 12
        results[name] = predictions(out)
    reference = results["pt"]
    right = sum(top[0][0] == Path(path).parent.name for path, top in reference.items())
    assert right >= 11  # a trained model: the comparison is of real predictions
    for name in ("onnx", "ts"):
        assert results[name].keys() == reference.keys()
        for path, top in results[name].items():
            assert [c for c, _ in top] == [c for c, _ in reference[path]], (name, path)
            assert [p for _, p in top] == pytest.approx([p for _, p in reference[path]], abs=1e-5)

    # The temperature is applied: the checkpoint's probabilities are softmax(logits / T), computed here by hand.
    predictor = load_predictor(checkpoint, "cpu", "fp32")
    images = [np.random.default_rng(1).integers(0, 256, (19, 19, 3), dtype=np.uint8)]
    logits = torch_logits(checkpoint, model_input(images, predictor.meta))
    np.testing.assert_allclose(
        predictor.probabilities(images), torch.softmax(torch.from_numpy(logits).double() / TEMPERATURE, 1).numpy()
    )


# What `inatpipe predict` from an .onnx file may import: numpy, Pillow, tqdm, onnxruntime (with its own small
# dependencies) and the package itself. Every other dependency of the project is refused in the test below.
BLOCKED = (
    "torch", "torchvision", "dvc", "dvclive", "yaml", "sklearn", "pandas", "tabulate", "matplotlib", "optuna",
    "sqlalchemy", "psycopg", "scipy", "onnx", "onnxscript",
)  # fmt: skip


def test_predict_from_onnx_runs_where_torch_cannot_be_imported(
    checkpoint: Path, exported: dict[str, Path], tmp_path: Path
):
    """A Python whose import system refuses torch and every other heavy dependency (a meta-path finder installed
    by sitecustomize) predicts from the .onnx file, as from an install of numpy, Pillow, tqdm and onnxruntime
    alone; the same Python fails on the checkpoint: the block is real."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {BLOCKED!r}\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is blocked in this test', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Refuse())\n"
    )
    folder = write_image_folder(tmp_path / "imgs", per_class=2, seed=3)
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{SRC}"}
    code = (
        "import sys\n"
        "from inatpipe.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n"
    )

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", code, *args]
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    onnx_run = run("predict", "--model", str(exported["onnx"]), str(folder))
    assert onnx_run.returncode == 0, onnx_run.stderr
    assert len(onnx_run.stdout.strip().splitlines()) == 6 and onnx_run.stderr.strip().endswith("no torch")
    checkpoint_run = run("predict", "--model", str(checkpoint), str(folder))
    assert checkpoint_run.returncode != 0 and "torch is blocked in this test" in checkpoint_run.stderr
    sweep = run("sweep", "run")  # the commands that need what is missing say so in one line
    assert sweep.returncode == 2 and sweep.stderr.startswith("error: `inatpipe sweep` needs ")


def test_parity_counts_top1_differences_and_fails_in_one_line(checkpoint: Path, exported: dict[str, Path], capsys):
    """The parity measurement on prepared test images: the exported model against its own torch model agrees on
    every image; against a torch model whose head favours another class it disagrees, and the check fails."""
    folder = write_image_folder(checkpoint.parent / "test", per_class=4, seed=11)
    prepared = checkpoint.parent / "prepared"
    prepare({"test": scan_folder(folder)}, CLASSES, 16, prepared)
    model, meta = load_checkpoint(checkpoint)
    runner = onnx_runner(exported["onnx"])

    same = measure_parity(model, runner, (x for x, _ in prepared_test_inputs(prepared, meta, 5)))
    assert (same.images, same.top1_mismatches) == (12, 0) and same.max_abs_logit_diff < 1e-4
    assert same.metrics()["top1_agreement"] == 1.0
    same.check("export@flexible")  # no error

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head[-1].bias[0] += 100.0  # every image now goes to class 0
    differs = measure_parity(other, runner, (x for x, _ in prepared_test_inputs(prepared, meta, 5)))
    assert differs.images == 12 and differs.top1_mismatches == 8  # the 8 images that are not of class 0
    assert differs.max_abs_logit_diff == pytest.approx(100.0, abs=1e-3)
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(lambda: differs.check("export@flexible"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "export@flexible: the exported model's top-1 class differs from torch's on 8 of 12 images" in err


def test_export_reports_bad_input_in_one_line(checkpoint: Path, tmp_path: Path, capsys):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    (tmp_path / "taken.onnx").mkdir()
    model = str(checkpoint)
    for args, message in (
        (("--model", model, "--format", "tflite"), "unknown format 'tflite'; choose one of onnx, torchscript"),
        (("--model", model, "--exporter", "jit"), "unknown ONNX exporter 'jit'; choose one of auto, torchscript, dyn"),
        (
            ("--model", str(not_a_checkpoint), "--out", str(tmp_path / "x.onnx")),
            "notes.pt is not a readable checkpoint",
        ),
        (("--model", str(tmp_path / "missing.pt")), "missing.pt not found"),
        (("--model", model, "--out", str(a_file / "model.onnx")), "a_file is not a writable folder"),
        (("--model", model, "--out", str(tmp_path / "taken.onnx")), "taken.onnx is a folder"),
        (("--model", model, "--format", "torchscript", "--out", str(tmp_path / "m.onnx")), "must end in .ts"),
    ):
        before = sorted(tmp_path.rglob("*"))
        code, _, err = run_main(capsys, "export", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_predict_reports_a_bad_exported_file_in_one_line(tmp_path: Path, capsys):
    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), foreign)
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    (tmp_path / "broken.ts").write_bytes(b"not a zip")
    image = next(write_image_folder(tmp_path / "imgs", per_class=1).rglob("*.png"))
    for model, message in (
        (foreign, "foreign.onnx carries no inatpipe metadata"),
        (tmp_path / "broken.onnx", "broken.onnx is not a readable ONNX model"),
        (tmp_path / "broken.ts", "broken.ts is not a readable TorchScript model"),
        (tmp_path / "missing.onnx", "missing.onnx not found"),
    ):
        code, _, err = run_main(capsys, "predict", "--model", str(model), str(image))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (model, err)
    code, _, err = run_main(capsys, "predict", "--model", str(foreign), "--precision", "bf16", str(image))
    assert code == 2 and "computes in fp32" in err
