"""Stage export@<model>: the checkpoint as models/<model>.onnx, with parity measured on every test image (onnxruntime
against torch, both fp32 on the CPU) in metrics/export/<model>.json; fails when top-1 differs on any image."""

import sys

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe import paths
from inatpipe.atomic import write_json
from inatpipe.errors import exit_on_user_error
from inatpipe.evaluation.export import export_with_parity
from inatpipe.params import Params, load_params
from inatpipe.runtime import configure_threads


def run(p: Params, name: str) -> None:
    threads = configure_threads()  # onnxruntime gets the same share of the cores as torch
    out = paths.onnx_model(name)
    exported = export_with_parity(
        paths.checkpoint(name), out, paths.PREPARED_DIR, p.evaluate.batch_size, threads, p.evaluate.onnx_exporter
    )
    parity, megabytes = exported.parity, round(exported.size_bytes / 1e6, 2)
    write_json(
        paths.export_metrics(name), {**parity.metrics(), "onnx_megabytes": megabytes, "exporter": exported.exporter}
    )
    parity.check(f"export@{name}")
    print(
        f"{name}: wrote {out} ({megabytes:.1f} MB, {exported.exporter} exporter); onnxruntime vs torch on "
        f"{parity.images} test images: top-1 equal on all, largest logit difference {parity.max_abs_logit_diff:.2g}"
    )


def main() -> None:
    run(load_params(), paths.model_argument(sys.argv, "export.py"))


if __name__ == "__main__":
    exit_on_user_error(main)
