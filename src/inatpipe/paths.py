"""Where stages read and write, relative to the project root; dvc.yaml declares the same paths."""

from pathlib import Path

from inatpipe.errors import UserError

SPLIT_DIR = Path("artifacts/split")
PREPARED_DIR = Path("artifacts/prepared")  # decoded once: <subset>.npy, <subset>_labels.npy, meta.json
STATS_FILE = Path("artifacts/stats.json")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
REPORTS_DIR = Path("reports")
DATA_REPORT = METRICS_DIR / "data_report.json"  # what split left out, and why
RESUME_DIR = Path(".resume")  # outside every DVC output, which DVC deletes before rerunning a stage; git-ignored
MODEL_NAMES = ("flexible", "resnet")


def model_argument(argv: list[str], script: str) -> str:
    """The model a `foreach` stage (evaluate@<model>, export@<model>) runs for: its one command-line argument."""
    if len(argv) != 2 or argv[1] not in MODEL_NAMES:
        raise UserError(f"usage: python stages/{script} {{{','.join(MODEL_NAMES)}}}")
    return argv[1]


def checkpoint(model: str) -> Path:
    return MODELS_DIR / f"{model}.pt"


def onnx_model(model: str) -> Path:
    return MODELS_DIR / f"{model}.onnx"


def export_metrics(model: str) -> Path:
    return METRICS_DIR / "export" / f"{model}.json"


def train_metrics_dir(model: str) -> Path:
    return METRICS_DIR / f"train_{model}"


def eval_metrics_dir(model: str) -> Path:
    return METRICS_DIR / "evaluate" / model


def report_dir(model: str) -> Path:
    return REPORTS_DIR / model


def resume_state(model: str) -> Path:
    return RESUME_DIR / f"train_{model}.pt"


FEATURES_DIR = Path("artifacts/features")
FEATURES_FILE = FEATURES_DIR / "backbone.pt"  # pooled backbone features of the train and val subsets
FEATURES_SKIPPED = FEATURES_DIR / "skipped.json"  # written instead when the features can't be reused
