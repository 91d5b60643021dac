"""`inatpipe serve` end to end: the real server (uvicorn, in its own process, on a free port of 127.0.0.1) over real
HTTP. It answers as `inatpipe predict` does, turns every bad upload into a 4xx with a message and goes on serving,
answers 200 requests from 8 clients at once, shows the prediction in a real browser with no network, and stops
cleanly on Ctrl-C."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import socket
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from inatpipe.cli import main
from inatpipe.serve.app import MAX_UPLOAD_BYTES
from inatpipe.testing import ServerProcess, http, post_file

from .browser import chromium, render_live
from .conftest import ROOT, trained_checkpoint, write_image_folder
from .test_predict_inspect import run_main

pytestmark = pytest.mark.xdist_group("serve")  # one server for the module, on one worker

CONFIG = {"image_size": 16, "num_filters": (8, 16), "dense_neurons": 32, "dropout": 0.0}
CLASSES = ["cat", "dog", "owl"]


@dataclass
class Server:
    url: str
    running: ServerProcess
    checkpoint: Path
    images: list[Path]  # new images of the trained classes
    expected: dict[str, tuple[list[str], list[float]]]  # key(image) -> `inatpipe predict`'s top-3 and probabilities


def key(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"  # the folder is the true class: names repeat across folders


def predicted_by_the_cli(checkpoint: Path, folder: Path, out: Path) -> dict[str, tuple[list[str], list[float]]]:
    """`inatpipe predict`'s top-3 for every image under `folder` (by `key`), one image per forward pass as the server
    runs; in this process, while the server starts in its own."""
    main(["predict", "--model", str(checkpoint), str(folder), "--top-k", "3", "--batch-size", "1", "--csv", str(out)])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    return {
        key(Path(row["path"])): (
            [row[f"class_{r}"] for r in (1, 2, 3)],
            [float(row[f"probability_{r}"]) for r in (1, 2, 3)],
        )
        for row in rows
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("serve")
    checkpoint = trained_checkpoint(root, CLASSES, CONFIG)
    running = ServerProcess(checkpoint, root / "server.log", ROOT / "src")
    try:
        folder = write_image_folder(root / "new", per_class=3, seed=7, ext=".jpg")
        expected = predicted_by_the_cli(checkpoint, folder, root / "predicted.csv")
        yield Server(running.url, running, checkpoint, sorted(folder.rglob("*.jpg")), expected)
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


def healthy(server: Server) -> bool:
    status, _, body = http(server.url + "health")
    return status == 200 and json.loads(body)["status"] == "ok"


def test_health_describes_the_model(server: Server):
    status, headers, body = http(server.url + "health")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "status": "ok",
        "model": "flexible.pt",
        "classes": CLASSES,
        "image_size": 16,
        "explain": True,
        "max_upload_bytes": MAX_UPLOAD_BYTES,
    }


def test_predict_answers_as_the_predict_command(server: Server):
    for path in server.images:
        status, _, body = post_file(server.url + "predict?top_k=3", path.read_bytes(), path.name)
        assert status == 200, body
        answer = json.loads(body)
        classes, probabilities = server.expected[key(path)]
        assert answer["file"] == path.name and [t["class"] for t in answer["top"]] == classes
        assert [t["probability"] for t in answer["top"]] == pytest.approx(probabilities, abs=2e-6)
    right = sum(server.expected[key(p)][0][0] == p.parent.name for p in server.images)
    assert right >= 8  # a trained model: its answers are worth comparing
    status, _, body = post_file(server.url + "predict", server.images[0].read_bytes())
    assert len(json.loads(body)["top"]) == 3  # top_k defaults to 5, and there are 3 classes


def test_explain_returns_the_overlay_of_the_predicted_class(server: Server):
    path = server.images[-1]
    status, headers, body = post_file(server.url + "explain", path.read_bytes(), path.name)
    assert status == 200 and headers["content-type"] == "image/png"
    assert headers["x-predicted-class"] == server.expected[key(path)][0][0]
    with Image.open(path) as original, Image.open(io.BytesIO(body)) as overlay:
        assert overlay.format == "PNG" and max(overlay.size) == 320  # drawn at display size, aspect kept
        assert overlay.size[0] / overlay.size[1] == pytest.approx(original.size[0] / original.size[1], abs=0.02)


def png_bytes(size: tuple[int, int] = (20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "case, send, status, message",
    [
        (
            "not an image",
            lambda u: post_file(u + "predict", b"plain text", "notes.txt"),
            415,
            "not a readable image",
        ),
        ("truncated", lambda u: post_file(u + "predict", png_bytes()[:60], "cut.png"), 415, "not a readable image"),
        ("empty", lambda u: post_file(u + "predict", b"", "empty.jpg"), 400, "empty.jpg is empty"),
        ("too large", lambda u: post_file(u + "predict", bytes(MAX_UPLOAD_BYTES + 1)), 413, "over the limit of 10 MiB"),
        ("wrong field", lambda u: post_file(u + "predict", png_bytes(), field="image"), 422, "a field named 'file'"),
        ("not multipart", lambda u: http(u + "predict", png_bytes(), "image/png"), 422, "a field named 'file'"),
        ("bad top_k", lambda u: post_file(u + "predict?top_k=0", png_bytes()), 422, "top_k"),
        ("explain, not an image", lambda u: post_file(u + "explain", b"GIF89a?", "x.gif"), 415, "not a readable image"),
    ],
)
def test_a_bad_upload_gets_a_4xx_message_and_the_server_goes_on(server: Server, case, send, status, message):
    got, headers, body = send(server.url)
    assert got == status and headers["content-type"] == "application/json", (case, body)
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and message in detail and "Traceback" not in detail, detail
    assert healthy(server)


def test_200_requests_from_8_clients_are_all_answered_right(server: Server):
    jobs = [server.images[i % len(server.images)] for i in range(200)]

    def ask(path: Path) -> str:
        status, _, body = post_file(server.url + "predict", path.read_bytes(), path.name)
        assert status == 200, body
        return json.loads(body)["top"][0]["class"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [server.expected[key(p)][0][0] for p in jobs]


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="needs Chromium to load the page (Debian: apt-get install chromium chromium-driver)",
)
def test_the_page_shows_the_prediction_in_a_browser_without_network(server: Server):
    """The page, opened in headless Chromium that can reach nothing but the server, is given an image and shows the
    predicted class and the overlay. Given an image from elsewhere on the web, it can't fetch it: the check can fail."""
    assert chromium(), "CI runs every test: .ci/run installs Chromium"
    _, _, page = http(server.url)
    assert not re.search(rb"(src|href)\s*=\s*[\"']?(https?:)?//|https?://", page)  # every resource is the server's
    path = server.images[0]
    image = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    dom = render_live(f"{server.url}?image={urllib.parse.quote(image, safe='')}")
    assert 'data-state="done"' in dom, dom[-3000:]
    shown = re.search(r'id="prediction" data-class="([^"]*)"', dom)
    assert shown and shown.group(1) == server.expected[key(path)][0][0], dom[-3000:]
    assert re.search(r'<img id="overlay" [^>]*src="blob:http://127\.0\.0\.1', dom)
    assert len(re.findall(r'class="row"', dom)) == 3  # the top 5 of three classes: three bars

    dom = render_live(f"{server.url}?image={urllib.parse.quote('https://example.com/owl.jpg', safe='')}")
    assert 'data-state="error"' in dom and "could not read the image" in dom, dom[-3000:]


def test_serve_reports_a_busy_port_and_a_missing_model_in_one_line(server: Server, tmp_path: Path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        code, _, err = run_main(capsys, "serve", "--model", str(server.checkpoint), "--port", port)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_main(capsys, "serve", "--model", str(tmp_path / "missing.pt"), "--port", "0")
    assert code == 2 and "missing.pt not found" in err and len(err.strip().splitlines()) == 1, err


def test_ctrl_c_stops_the_server_cleanly(server: Server):
    """Last: it stops the module's server. Every answer so far went through without a traceback or a 500."""
    assert server.running.stop() == 0
    log = server.running.log.read_text()
    assert "Shutting down" in log and "Finished server process" in log and log.endswith("stopped\n")
    assert "Traceback" not in log and '" 500 ' not in log
    assert re.search(r'"POST /predict\?top_k=3 HTTP/1.1" 200', log) and "predict " in log  # requests were logged
