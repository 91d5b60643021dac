"""CPU seconds of torch's two ONNX exporters on the test suite's small models: torch's default, torch.export-based one
(`dynamo=True`) and the deprecated TorchScript-based one (`dynamo=False`, what `evaluate.onnx_exporter: auto` picks
while torch ships it).

Each exporter runs in a fresh process, so its first export pays the one-off set-up a stage pays. CPU time, not wall
time: the figure holds on a machine shared with other work.

    .venv/bin/python benchmarks/onnx_exporters.py
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import warnings

MODELS = (
    ("flexible_cnn", {"image_size": 16, "num_filters": [8, 16], "dense_neurons": 32}),
    ("resnet", {"arch": "resnet18"}),
    ("flexible_cnn", {"image_size": 16, "num_filters": [8, 16], "dense_neurons": 32}),  # again: set-up paid
)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(exporter: str) -> list[float]:
    import torch

    from inatpipe.models import build_model

    warnings.simplefilter("ignore")
    seconds = []
    for name, config in MODELS:
        model = build_model(name, 3, config).eval()
        x = torch.randn(2, 3, 16, 16)
        start = cpu_seconds()
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
        else:
            axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes=axes)  # fmt: skip
        seconds.append(cpu_seconds() - start)
    return seconds


def main() -> None:
    if len(sys.argv) == 2:  # the child: one exporter
        print(json.dumps(measure(sys.argv[1])))
        return
    print("CPU seconds per export (first: with the exporter's set-up)")
    print(f"{'exporter':<12} {'FlexibleCNN':>12} {'ResNet18':>9} {'FlexibleCNN again':>18}")
    for exporter in ("dynamo", "legacy"):
        out = subprocess.run([sys.executable, __file__, exporter], capture_output=True, text=True, check=True)
        first, resnet, again = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{exporter:<12} {first:12.2f} {resnet:9.2f} {again:18.2f}")


if __name__ == "__main__":
    main()
