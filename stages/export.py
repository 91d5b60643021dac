"""Stage export@<model>: the checkpoint as models/<model>.onnx, with parity measured on every test image (onnxruntime
against torch, both fp32 on the CPU) in metrics/export/<model>.json; fails when top-1 differs on any image."""

import sys

from inatpipe import paths
from inatpipe.atomic import write_json
from inatpipe.errors import UserError, exit_on_user_error
from inatpipe.evaluation.export import export_with_parity
from inatpipe.params import Params, load_params
from inatpipe.runtime import configure_threads


def run(p: Params, name: str) -> None:
    threads = configure_threads()  # onnxruntime gets the same share of the cores as torch
    out = paths.onnx_model(name)
    parity, size = export_with_parity(
        paths.checkpoint(name), out, paths.PREPARED_DIR, p.evaluate.batch_size, threads=threads
    )
    write_json(paths.export_metrics(name), {**parity.metrics(), "onnx_megabytes": round(size / 1e6, 2)})
    parity.check(f"export@{name}")
    print(
        f"{name}: wrote {out} ({size / 1e6:.1f} MB); onnxruntime vs torch on {parity.images} test images: top-1 "
        f"equal on all, largest logit difference {parity.max_abs_logit_diff:.2g}"
    )


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in paths.MODEL_NAMES:
        raise UserError(f"usage: python stages/export.py {{{','.join(paths.MODEL_NAMES)}}}")
    run(load_params(), sys.argv[1])


if __name__ == "__main__":
    exit_on_user_error(main)
