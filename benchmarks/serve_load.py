"""`inatpipe serve` under load: N requests from C clients at once, each an image file POSTed to /predict (or
/explain), against the real server in its own process. Prints the median and 95th-percentile latency per request
and the requests per second, after checking every answer's class against `inatpipe predict` on the same file.

    .venv/bin/python benchmarks/serve_load.py --model models/flexible.pt --images data/val
    .venv/bin/python benchmarks/serve_load.py --model models/resnet.pt --images data/val --endpoint explain

The images are the first --files image files under --images (sorted, taken evenly from the sorted list), sent in
turn; the server is warmed up with one request per client before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from inatpipe.evaluation.predict import collect_images, predict_files
from inatpipe.evaluation.predictor import load_predictor
from inatpipe.testing import ServerProcess, post_file

ROOT = Path(__file__).resolve().parents[1]


def answered_class(url: str, endpoint: str, path: Path) -> tuple[str, float]:
    """(predicted class, seconds) of one request; an answer other than 200 stops the benchmark."""
    start = time.perf_counter()
    status, headers, body = post_file(url + endpoint, path.read_bytes(), path.name)
    seconds = time.perf_counter() - start
    if status != 200:
        raise SystemExit(f"{endpoint} {path}: {status} {body[:200]!r}")
    if endpoint == "explain":
        return headers["x-predicted-class"], seconds
    return json.loads(body)["top"][0]["class"], seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/flexible.pt"))
    p.add_argument("--images", type=Path, default=Path("data/val"))
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--files", type=int, default=50, help="distinct image files to send in turn (default: 50)")
    p.add_argument("--endpoint", choices=("predict", "explain"), default="predict")
    args = p.parse_args()

    files = collect_images([args.images])
    files = files[:: max(1, len(files) // args.files)][: args.files]
    predictor = load_predictor(args.model, "cpu")
    expected = {f: pred.top[0][0] for f, pred in zip(files, predict_files(predictor, files, 1, 1), strict=True)}

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(args.model.resolve(), Path(tmp) / "server.log", ROOT / "src")
        try:
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                list(pool.map(lambda f: answered_class(server.url, args.endpoint, f), files[: args.clients]))
                jobs = [files[i % len(files)] for i in range(args.requests)]
                start = time.perf_counter()
                answers = list(pool.map(lambda f: answered_class(server.url, args.endpoint, f), jobs))
                wall = time.perf_counter() - start
        finally:
            server.stop()

    wrong = sum(label != expected[f] for (label, _), f in zip(answers, jobs, strict=True))
    latencies = sorted(seconds * 1000 for _, seconds in answers)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * len(latencies)) - 1)]
    print(f"cores: {os.cpu_count()}   python: {sys.version.split()[0]}   model: {args.model}")
    print(f"{args.requests} requests to /{args.endpoint} from {args.clients} clients, {len(files)} distinct files")
    print(f"  answered right:   {args.requests - wrong} of {args.requests}")
    print(f"  latency median:   {statistics.median(latencies):7.1f} ms")
    print(f"  latency p95:      {p95:7.1f} ms")
    print(f"  throughput:       {args.requests / wall:7.1f} requests/s  ({wall:.1f} s in all)")
    if wrong:
        raise SystemExit(f"{wrong} answers differ from `inatpipe predict`")


if __name__ == "__main__":
    main()
