"""Stage evaluate@<model>: score a checkpoint on the held-out test set (with test-time augmentation and the
checkpoint's temperature as evaluate.tta and evaluate.calibrate say); metrics, per-image predictions, per-class
table, confusion matrix, calibration before and after the temperature, and the images under reports/<model>/
(Grad-CAM overlays among them)."""

import sys

import numpy as np
from dvclive import Live

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe import paths
from inatpipe.atomic import atomic_open, write_json
from inatpipe.checkpoint import load_checkpoint
from inatpipe.cores import loader_workers
from inatpipe.data.index import read_index
from inatpipe.errors import exit_on_user_error
from inatpipe.evaluation.explain import Explainer, write_gradcam_report
from inatpipe.evaluation.figures import write_model_report
from inatpipe.evaluation.metrics import evaluate_model, predictions_table
from inatpipe.params import Params, load_params
from inatpipe.runtime import choose_device, configure_threads


def run(p: Params, name: str) -> None:
    device = choose_device(p.device)
    configure_threads()
    test = read_index(paths.SPLIT_DIR / "test.csv")
    model, meta = load_checkpoint(paths.checkpoint(name), device)  # for the metrics, then for Grad-CAM
    m, pred, classes = evaluate_model(
        model,
        meta,
        paths.PREPARED_DIR,
        p.evaluate.batch_size,
        device,
        p.evaluate.precision,
        loader_workers(),  # the metrics do not depend on it: no param for it
        tta=p.evaluate.tta,
        calibrate=p.evaluate.calibrate,
    )
    out = paths.eval_metrics_dir(name)
    with Live(str(out), dvcyaml=False, save_dvc_exp=False) as live:
        # test.ece and test.loss: of the probabilities reported (at the temperature when calibrated); the
        # *_uncalibrated ones: of the plain softmax, so the metrics show what the temperature does.
        scores = ("loss", "accuracy", "macro_f1", "ece", "ece_uncalibrated", "loss_uncalibrated")
        live.summary = {
            "test": {k: m[k] for k in scores},
            "temperature": m["temperature"],
            "infer_images_per_second": round(m["infer_images_per_second"], 1),
        }
        names = [classes[i] for i in pred.targets], [classes[i] for i in pred.predicted]
        live.log_sklearn_plot("confusion_matrix", *names, name="confusion_matrix.json")
    write_json(out / "per_class.json", [{"class": c, **scores} for c, scores in m["per_class"].items()])
    with atomic_open(out / "predictions.csv") as f:
        predictions_table(pred, classes, test["path"].tolist()).to_csv(f, index=False, lineterminator="\n")
    images = np.load(paths.PREPARED_DIR / "test.npy", mmap_mode="r")  # the test images as the model saw them
    write_model_report(paths.report_dir(name), name, m, images, pred.targets, pred.predicted, pred.confidence, classes)
    explainer = Explainer(model, meta, device)
    gradcam = paths.report_dir(name) / "gradcam.png"
    title = f"{name}: Grad-CAM, most confident mistakes, then one correct test image per class"
    write_gradcam_report(explainer, images, pred.targets, pred.predicted, pred.confidence, gradcam, title)
    print(
        f"{name}: test accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}  "
        f"ECE {m['ece']:.4f} (uncalibrated {m['ece_uncalibrated']:.4f}, temperature {m['temperature']:.3f}"
        f"{'' if p.evaluate.calibrate else ', not applied'}); images in {paths.report_dir(name)}/"
    )


def main() -> None:
    run(load_params(), paths.model_argument(sys.argv, "evaluate.py"))


if __name__ == "__main__":
    exit_on_user_error(main)
