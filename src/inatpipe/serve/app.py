"""A trained model as a small web app (FastAPI on uvicorn): `POST /predict` (an image file -> top-k classes with
probabilities, JSON), `POST /explain` (-> the Grad-CAM overlay, PNG), `GET /health`, and `GET /`, one HTML page
with its CSS and JavaScript inline, so it works with no network at all.

Uploads are decoded by the project's one decoder, as `inatpipe predict` reads files, so a file gets the same
answer from both. Whatever an upload is, the answer is JSON: a 4xx with a `detail` line for a bad one, never a 500.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Protocol

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from inatpipe.data.images import DECODE_ERRORS
from inatpipe.errors import UserError
from inatpipe.evaluation.explain import Explainer, overlay_png, read_upload
from inatpipe.evaluation.model_info import ONNX_SUFFIX, TORCHSCRIPT_SUFFIX
from inatpipe.evaluation.predictor import load_predictor

# A phone photo is 2-8 MB; 10 MiB leaves room and keeps a stray upload of a video from filling memory or disk.
MAX_UPLOAD_BYTES = 10 * 2**20
TOP_K = 5
PAGE = Path(__file__).with_name("page.html")
FIELD = "file"
log = logging.getLogger("uvicorn.error")  # uvicorn's own logger: our lines print like its lines, at its log level


class Predictor(Protocol):
    """What serving needs of a model: its classes, its input size and class probabilities for prepared images
    ((side, side, 3) uint8, as `inatpipe predict` prepares them) -> (n, classes) array. A checkpoint's Explainer is
    one; an exported model's predictor can be another (the page then shows no overlay)."""

    @property
    def classes(self) -> Sequence[str]: ...

    @property
    def image_size(self) -> int: ...

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[Predictor, Explainer | None]:
    """The model file to serve: (its predictor, its Grad-CAM explainer or None when the file can't give one)."""
    if path.suffix.lower() in (ONNX_SUFFIX, TORCHSCRIPT_SUFFIX):  # exported files: predictions, no Grad-CAM
        return load_predictor(path, "cpu"), None
    explainer = Explainer.from_checkpoint(path, device)
    return explainer, explainer


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 and is never held whole. A declared length over
    the limit is answered after the body is drained (so the client, still sending, reads the answer rather than a
    reset connection); a chunked body is cut off once it passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def message(self) -> str:
        return f"the upload is over the limit of {self.limit / 2**20:g} MiB; send a smaller image"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            while (await receive()).get("more_body", False):
                pass
            await JSONResponse({"detail": self.message()}, 413)(scope, receive, send)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = error["loc"][-1] if error["loc"] else "request"
        if where == FIELD:
            problems.append(f"no image: send it as multipart/form-data in a field named '{FIELD}'")
        else:
            problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def create_app(
    predictor: Predictor,
    explainer: Explainer | None = None,
    name: str = "model",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The app serving `predictor` (and Grad-CAM overlays from `explainer`, when given) under the title `name`."""
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and this app works offline.
    app = FastAPI(title=f"inatpipe: {name}", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    page = PAGE.read_text(encoding="utf-8")
    model_lock = threading.Lock()  # one forward pass at a time: Grad-CAM's hook must see its own pass only

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, 422)

    def read(upload: UploadFile) -> tuple[bytes, np.ndarray]:
        data = upload.file.read()
        if not data:
            raise HTTPException(400, f"{upload.filename or 'the upload'} is empty; choose an image file")
        try:
            return data, read_upload(data, predictor.image_size)
        except Image.DecompressionBombError as e:
            raise HTTPException(413, f"{upload.filename}: too many pixels to decode safely ({e})") from None
        except DECODE_ERRORS as e:
            # Pillow names the BytesIO object it could not identify: say what that means instead.
            why = "not a format Pillow reads" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
            raise HTTPException(415, f"{upload.filename} is not a readable image ({why})") from None

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": name,
            "classes": list(predictor.classes),
            "image_size": predictor.image_size,
            "explain": explainer is not None,
            "max_upload_bytes": max_upload_bytes,
        }

    @app.post("/predict")
    def predict(
        file: Annotated[UploadFile, File(description="an image file")],
        top_k: Annotated[int, Query(ge=1, description="classes to return, most probable first")] = TOP_K,
    ) -> dict:
        _, image = read(file)
        start = time.perf_counter()
        with model_lock:
            probs = predictor.probabilities([image])[0]
        order = np.argsort(-probs, kind="stable")[: min(top_k, len(probs))]
        top = [{"class": predictor.classes[i], "probability": float(probs[i])} for i in order]
        ms = (time.perf_counter() - start) * 1000
        log.info("predict %s: %s %.3f (%.0f ms)", file.filename, top[0]["class"], top[0]["probability"], ms)
        return {"model": name, "file": file.filename, "top": top}

    if explainer is not None:

        @app.post("/explain", response_class=Response, responses={200: {"content": {"image/png": {}}}})
        def explain(file: Annotated[UploadFile, File(description="an image file")]) -> Response:
            data, image = read(file)
            start = time.perf_counter()
            with model_lock:
                png, label, probability = overlay_png(explainer, image, data)
            ms = (time.perf_counter() - start) * 1000
            log.info("explain %s: %s %.3f (%.0f ms)", file.filename, label, probability, ms)
            headers = {"X-Predicted-Class": label, "X-Probability": f"{probability:.6f}"}
            return Response(png, media_type="image/png", headers=headers)

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port) and listening, or a UserError of one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        why = e.strerror or e
        raise UserError(f"cannot listen on {host}:{port} ({why}); choose another --port or --host") from None
    return sock


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on a listening socket until Ctrl-C (or SIGTERM), which uvicorn turns into a clean shutdown. The
    line printed first says where the page is (with the real port when the socket was bound to port 0)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {app.title} on http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
    # uvicorn hands the Ctrl-C it handled back (as KeyboardInterrupt) once it has shut down: a normal stop here.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    print("stopped", flush=True)
