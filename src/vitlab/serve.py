"""HTTP serving: ``vitlab serve``, a FastAPI app under uvicorn that gathers concurrent requests into batched
ONNX Runtime calls.

An image sent here is decoded and converted by ``vitlab.inference.decode_image`` and classified by the same
``Classifier`` as ``vitlab predict``, so a file gets the same answer from both. Every request's images join
one bounded queue (``--queue`` images; full, a request is answered 503 with ``Retry-After``), and one worker
hands them to ONNX Runtime together: a batch closes at ``--max-batch`` images, ``--max-wait-ms`` after its
first image came, or as soon as no admitted request is still being read or decoded, whichever comes first.
The last rule keeps a lone client from waiting ``--max-wait-ms`` for company that is not coming; under load,
requests gather while the previous batch runs.

The batcher is vitlab's own (``Batcher``) rather than the ``batched`` package (0.1.5): that one polls its
queue every ``timeout_ms`` whatever is waiting (a lone request waits half of it on average), has no bound on
its queue (nothing to answer 503 from), and fails a whole batch when one call raises. An image's answer does
not depend on the batch it joins beyond float32 rounding (the export stage checks that the int8 model's top-1
is the same at batch 1 and 256), so batching changes no answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vitlab import __version__
from vitlab.errors import VitlabError, one_line
from vitlab.inference import MAX_PIXELS, Classifier, best_classes, decode_image

log = logging.getLogger("vitlab.serve")

RETRY_AFTER_S = 1  # what a 503 asks a client to wait: a full queue empties within a few batches
RAW_TYPES = ("image/", "application/octet-stream")  # media types of a body that is one image's bytes


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """How the server batches and what it accepts (``vitlab serve``'s options)."""

    max_batch: int = 64  # images per ONNX Runtime call, at most
    max_wait_ms: float = 5.0  # how long a batch's first image waits for others, at most
    queue: int = 1024  # images waiting for a batch, at most; also the most one request may send
    max_body_mb: float = 32.0  # request body limit, MiB
    drain_timeout_s: float = 30.0  # after SIGTERM, how long requests still arriving get to finish

    def __post_init__(self) -> None:
        """Raises VitlabError naming the first setting out of range."""
        for name, low in (("max_batch", 1), ("max_wait_ms", 0), ("queue", 1), ("max_body_mb", 0)):
            if not getattr(self, name) >= low:  # `not >=` also refuses NaN
                raise VitlabError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if not self.drain_timeout_s > 0:
            raise VitlabError(f"drain_timeout_s must be positive, got {self.drain_timeout_s}")

    @property
    def max_body_bytes(self) -> int:
        """The body limit in bytes."""
        return int(self.max_body_mb * 2**20)


class Metrics:
    """The Prometheus metrics of one server, in a registry of its own (not prometheus_client's global one,
    so two apps in a process, or a test's, never share counts)."""

    def __init__(self, max_batch: int):
        """Histogram buckets for batch sizes are the powers of two up to ``max_batch``."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vitlab_http_requests",
            "HTTP requests answered, by path and status",
            ["path", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vitlab_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by path",
            ["path"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
            registry=r,
        )
        self.images = Counter(
            "vitlab_images",
            "Images received by /predict, by outcome (classified, error)",
            ["outcome"],
            registry=r,
        )
        sizes = sorted({2**i for i in range(int(math.log2(max_batch)) + 1)} | {max_batch})
        self.batch_size = Histogram(
            "vitlab_batch_size", "Images per ONNX Runtime call", buckets=sizes, registry=r
        )
        self.inference = Histogram(
            "vitlab_inference_seconds",
            "Duration of one ONNX Runtime call (normalization and softmax included)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.queue = Gauge("vitlab_queue_images", "Images waiting for a batch", registry=r)
        self.incoming = Gauge(
            "vitlab_requests_incoming",
            "Requests to /predict being read or decoded: batches wait for their images",
            registry=r,
        )


class QueueFull(Exception):
    """The queue cannot take a request's images now; the client should retry later (HTTP 503)."""


@dataclasses.dataclass
class _Job:
    images: np.ndarray  # uint8 (n, S, S, C)
    future: asyncio.Future[np.ndarray]
    queued_at: float  # event-loop time


class Batcher:
    """Gathers the images of concurrent requests into ONNX Runtime calls on one worker thread.

    ``submit`` queues one request's images and returns a future of their float64 (n, classes) probabilities;
    a request calls it inside ``incoming()``, which tells the batcher that more images may be on their way.
    Not thread-safe: every method is called on the event loop's thread.
    """

    def __init__(self, classifier: Classifier, settings: ServeSettings, metrics: Metrics):
        """Nothing runs until ``start``."""
        self.classifier = classifier
        self.settings = settings
        self.metrics = metrics
        self.ready = False  # the warm-up batch has run
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued = 0  # images in _jobs
        self._incoming = 0  # requests admitted whose images are not queued yet
        self._draining = False
        self._changed = asyncio.Event()  # set on every change to _jobs, _incoming or _draining
        # One ONNX Runtime call at a time: its own intra-op threads use the cores; two calls would contend.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vitlab-onnxruntime")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker: a warm-up batch of ``max_batch`` images (ONNX Runtime sizes its buffers for the
        largest batch now, not under load), then the requests."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker (after ``drain`` and the last answer) and its thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def drain(self) -> None:
        """No request comes any more: close every batch at once, without waiting for fuller ones."""
        self._draining = True
        self._changed.set()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Marks a request whose images are being read or decoded: batches wait for them (up to max_wait)."""
        self._incoming += 1
        self.metrics.incoming.inc()
        try:
            yield
        finally:
            self._incoming -= 1
            self.metrics.incoming.dec()
            self._changed.set()

    def check_room(self, n: int) -> None:
        """QueueFull when the queue cannot take ``n`` more images now."""
        if self._queued + n > self.settings.queue:
            raise QueueFull(
                f"queue full: {self._queued} images waiting, {n} more would pass the limit of "
                f"{self.settings.queue} (--queue); retry after {RETRY_AFTER_S} s"
            )

    def submit(self, images: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Queue uint8 (n, S, S, C) images; QueueFull when the queue cannot take n more."""
        n = len(images)
        self.check_room(n)
        loop = asyncio.get_running_loop()
        job = _Job(images, loop.create_future(), loop.time())
        self._jobs.append(job)
        self._set_queued(self._queued + n)
        self._changed.set()
        return job.future

    def _set_queued(self, images: int) -> None:
        self._queued = images
        self.metrics.queue.set(images)

    def _classify(self, images: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        probabilities = self.classifier.predict(images, batch_size=self.settings.max_batch)
        self.metrics.inference.observe(time.perf_counter() - start)
        return probabilities

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        c = self.classifier
        warmup = np.zeros((self.settings.max_batch, c.image_size, c.image_size, c.channels), np.uint8)
        try:
            await loop.run_in_executor(self._executor, self._classify, warmup)
            self.ready = True
        except Exception as error:  # a broken model: /readyz stays 503; requests get their own errors
            log.error("warm-up batch failed: %s", one_line(error))
        while True:
            while not self._jobs:
                self._changed.clear()
                await self._changed.wait()
            await self._gather(loop)
            await self._run_batch(loop, self._take())

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self._jobs[0].queued_at + self.settings.max_wait_ms / 1000
        while self._queued < self.settings.max_batch and self._incoming and not self._draining:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _take(self) -> list[_Job]:
        """Whole requests, in arrival order, up to max_batch images (a larger request goes alone: the
        classifier splits it into max_batch calls)."""
        jobs: list[_Job] = []
        images = 0
        while self._jobs and (not jobs or images + len(self._jobs[0].images) <= self.settings.max_batch):
            job = self._jobs.popleft()
            self._set_queued(self._queued - len(job.images))
            if not job.future.done():  # a cancelled request's images are not worth classifying
                jobs.append(job)
                images += len(job.images)
        return jobs

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        if not jobs:
            return
        try:
            images = np.concatenate([job.images for job in jobs]) if len(jobs) > 1 else jobs[0].images
            self.metrics.batch_size.observe(len(images))
            probabilities = await loop.run_in_executor(self._executor, self._classify, images)
        except Exception as error:  # each request of the batch answers 500 with its own log line
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(probabilities[start : start + len(job.images)])
            start += len(job.images)


class _Refused(Exception):
    """A request answered with an error status: ``detail`` is the client's one-line reason."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """The ASGI middleware around every request: enforces the body limit (413), turns an unexpected error
    into a 500 that names only its type, and for each answer counts it (by path and status), times it and,
    for an error, writes one log line with its reason, all before the answer's last byte leaves, so a client
    that reads /metrics after its answer sees it counted."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, paths: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.paths = paths  # known paths: the metrics' path label takes no value a client invents

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"] if scope["path"] in self.paths else "other"
        request = f"{scope['method']} {scope['path']}"
        status = 0  # until the answer starts
        error_body = b""
        reason: str | None = None  # the log's reason when it is not the answer's (a 500's)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # a chunked body, or one longer than its Content-Length
                raise _BodyTooLarge
            return message

        async def watched_send(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if status >= 400:
                    error_body += message.get("body", b"")
                if not message.get("more_body", False):
                    self.metrics.requests.labels(path, str(status)).inc()
                    self.metrics.latency.labels(path).observe(time.perf_counter() - start)
                    if status >= 400:
                        level = logging.ERROR if status >= 500 else logging.WARNING
                        log.log(level, "%d %s: %s", status, request, reason or _detail(error_body))
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                raise _BodyTooLarge
            await self.app(scope, limited_receive, watched_send)
        except _BodyTooLarge:
            if not status:
                mib = f"{self.max_body_bytes / 2**20:g}"
                too_large = _error(413, f"request body over the {mib} MiB limit (--max-body-mb)")
                await too_large(scope, receive, watched_send)
        except ClientDisconnect:
            pass  # the client left before its body was read: nobody to answer
        except Exception as error:
            reason = f"internal error: {type(error).__name__}: {one_line(error)}"
            if os.environ.get("VITLAB_DEBUG"):
                log.exception(reason)
            if status:  # the answer had begun: all that is left is to say so
                log.error("%d %s: %s, after the answer began", status, request, reason)
            else:
                await _error(500, f"internal error ({type(error).__name__})")(scope, receive, watched_send)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _detail(body: bytes) -> str:
    """The one-line reason in an error answer's JSON: its "detail" (FastAPI's validation errors: a list)."""
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace") or "(no detail)"
    return _validation_line(detail) if isinstance(detail, list) else str(detail)


def _validation_line(errors: list[dict[str, Any]]) -> str:
    """FastAPI's validation errors ([{"loc": ["query", "top_k"], "msg": "..."}]) as one line."""
    return "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg', '')}" for e in errors)


class Answer(BaseModel):
    """One image's answer: its top-k labels and probabilities, best first, or why it could not be read."""

    part: int = Field(description="1-based position of the image in the request")
    filename: str | None = Field(description="the multipart part's filename, if it had one")
    labels: list[str] = Field(description="best first; empty when error is set")
    probabilities: list[float] = Field(description="of each label (softmax of the logits, float64)")
    error: str | None = Field(None, description="why this image could not be classified")


class Predictions(BaseModel):
    """The answers to a /predict request, in the order its images were sent."""

    detail: str | None = Field(None, description="on 422: which images failed and why")
    model: str
    predictions: list[Answer]


class ErrorDetail(BaseModel):
    """An error answer."""

    detail: str


class Health(BaseModel):
    """/healthz and /readyz."""

    status: str


class Limits(BaseModel):
    """What the server accepts (its options) and the pixel limit of every image."""

    max_batch: int
    max_wait_ms: float
    queue_images: int
    max_body_bytes: int
    max_pixels: int


class Metadata(BaseModel):
    """/metadata: the model file's metadata, the providers it runs on, the server's limits."""

    model: str = Field(description="the model file's name")
    class_names: list[str] = Field(description="in logit order")
    image_size: int = Field(description="images are converted to image_size x image_size")
    channels: int = Field(description="3: RGB, 1: grayscale")
    input_layout: str | None
    mean: list[float] = Field(description="per channel, on pixels/255")
    std: list[float]
    arch: str | None
    preset: str | None = Field(description="model.preset in params.yaml")
    config: dict[str, Any] | None = Field(description="the architecture's full configuration")
    dataset: str | None
    test_accuracy: float | None = Field(description="of the run that exported it, on its test set")
    params_sha256: str | None = Field(description="sha256 of the run's validated params")
    quantization: str | None = Field(description="for an int8 model: how it was quantized")
    providers: list[str] = Field(description="ONNX Runtime execution providers, first used first")
    limits: Limits


def model_metadata(classifier: Classifier, model_name: str, settings: ServeSettings) -> dict[str, Any]:
    """What /metadata answers: the model's classes, input geometry and normalization, architecture and preset,
    test accuracy and params digest (from the file's metadata, written by the export stage), the ONNX Runtime
    providers it runs on and the server's limits. VitlabError if its config or test_accuracy is invalid."""
    meta = classifier.metadata
    try:
        config = json.loads(meta["config"]) if "config" in meta else None
        accuracy = float(meta["test_accuracy"]) if meta.get("test_accuracy") else None
    except ValueError as error:
        raise VitlabError(f"{model_name}: no valid vitlab metadata ({error})") from None
    return {
        "model": model_name,
        "class_names": classifier.class_names,
        "image_size": classifier.image_size,
        "channels": classifier.channels,
        "input_layout": meta.get("input_layout"),
        "mean": json.loads(meta["mean"]),
        "std": json.loads(meta["std"]),
        "arch": meta.get("arch"),
        "preset": meta.get("model_preset") or None,
        "config": config,
        "dataset": meta.get("dataset"),
        "test_accuracy": accuracy,
        "params_sha256": meta.get("params_sha256") or None,
        "quantization": meta.get("quantization"),
        "providers": classifier.providers,
        "limits": {
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "queue_images": settings.queue,
            "max_body_bytes": settings.max_body_bytes,
            "max_pixels": MAX_PIXELS,
        },
    }


_IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "several images as multipart files (any field name; in order), or one image's bytes",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "image/*": _IMAGE_BODY,
            "application/octet-stream": _IMAGE_BODY,
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "a malformed multipart body, or more parts than --queue"},
    413: {"model": ErrorDetail, "description": "the body is over --max-body-mb"},
    415: {"model": ErrorDetail, "description": "neither multipart/form-data nor an image's bytes"},
    422: {"model": Predictions, "description": "some image could not be read: its answer says why"},
    503: {"model": ErrorDetail, "description": "the queue is full: retry after Retry-After seconds"},
}


def create_app(classifier: Classifier, model_name: str, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``classifier``; its lifespan starts and stops the batcher."""
    settings = settings or ServeSettings()
    metrics = Metrics(settings.max_batch)
    batcher = Batcher(classifier, settings, metrics)
    metadata = model_metadata(classifier, model_name, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="vitlab serve",
        version=__version__,
        description=f"Image classification with {model_name} ({', '.join(classifier.class_names[:3])}, ...)",
        lifespan=lifespan,
    )

    @app.exception_handler(_Refused)
    async def refused(request: Request, error: _Refused) -> JSONResponse:
        return _error(error.status, error.detail, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        """A bad query parameter (``top_k=0``): 422 with the one-line ``detail`` every error answer has."""
        return _error(422, _validation_line(list(error.errors())))

    @app.post("/predict", response_model=Predictions, responses=_ERRORS, openapi_extra=_PREDICT_BODY)
    async def predict(
        request: Request, top_k: int = Query(3, ge=1, description="labels per image")
    ) -> JSONResponse:
        """Classify one or several images: multipart files (in order), or the raw bytes of one image."""
        with batcher.incoming():
            parts = await _read_images(request, settings.queue)
            try:
                # Before decoding too: an overloaded server spends nothing on a request it will refuse.
                batcher.check_room(len(parts))
                size, channels = classifier.image_size, classifier.channels
                decoded = await run_in_threadpool(_decode_all, parts, size, channels)
                good = [image for image in decoded if isinstance(image, np.ndarray)]
                future = batcher.submit(np.stack(good)) if good else None
            except QueueFull as full:
                raise _Refused(503, str(full), {"Retry-After": str(RETRY_AFTER_S)}) from None
        probabilities = iter(await future) if future is not None else iter(())
        names, k = classifier.class_names, min(top_k, len(classifier.class_names))
        answers, failures = [], []
        for part, ((filename, _), image) in enumerate(zip(parts, decoded, strict=True), 1):
            answer: dict[str, Any] = {"part": part, "filename": filename, "labels": [], "probabilities": []}
            if isinstance(image, str):
                answer["error"] = image
                failures.append(f"{_part_name(part, filename)}: {image}")
            else:
                answer["labels"], answer["probabilities"] = best_classes(next(probabilities), names, k)
                answer["error"] = None
            answers.append(answer)
        metrics.images.labels("classified").inc(len(good))
        metrics.images.labels("error").inc(len(failures))
        detail = f"{len(failures)} of {len(parts)} images could not be classified: " if failures else None
        body = {
            "detail": detail and detail + "; ".join(failures),
            "model": model_name,
            "predictions": answers,
        }
        return JSONResponse(body, status_code=422 if failures else 200)

    @app.get("/metadata", response_model=Metadata)
    async def get_metadata() -> dict[str, Any]:
        """The model's classes, input geometry and normalization, architecture, preset, test accuracy and
        params digest, with the server's limits."""
        return metadata

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, str]:
        """200 while the process is up."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, responses={503: {"model": ErrorDetail}})
    async def readyz() -> dict[str, str]:
        """200 once the model is loaded and its warm-up batch has run; 503 before."""
        if not batcher.ready:
            raise _Refused(503, "warming up: the first batch has not run yet")
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response)
    async def get_metrics() -> Response:
        """Prometheus metrics: requests by path and status, images, batch sizes, queue depth, latency."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.batcher = batcher  # run() drains it on SIGTERM
    paths = frozenset(route.path for route in app.routes)  # type: ignore[attr-defined]
    app.add_middleware(_Guard, metrics=metrics, max_body_bytes=settings.max_body_bytes, paths=paths)
    return app


async def _read_images(request: Request, most: int) -> list[tuple[str | None, bytes | str]]:
    """(filename, bytes) per image of the request, in order; a multipart text field gives its error message in
    place of the bytes. _Refused for another media type (415), a malformed body or too many parts (400)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        parts: list[tuple[str | None, bytes | str]] = []
        # The body limit bounds the bytes; the part limits bound the objects made per part.
        async with request.form(max_files=most, max_fields=most) as form:
            for field, value in form.multi_items():
                if isinstance(value, UploadFile):
                    parts.append((value.filename, await value.read()))
                else:
                    parts.append(
                        (None, f"field {field!r} is text, not a file (curl: -F '{field}=@photo.jpg')")
                    )
        if len(parts) > most:
            raise _Refused(400, f"{len(parts)} parts: at most {most} images per request (--queue)")
    elif media.startswith(RAW_TYPES):
        parts = [(None, await request.body())]
    else:
        raise _Refused(
            415,
            f"unsupported media type {media or '(none)'!r}: send multipart/form-data files or one image's "
            "bytes (image/*, application/octet-stream)",
        )
    if not parts:
        raise _Refused(400, "no image in the request")
    return parts


def _part_name(part: int, filename: str | None) -> str:
    return f"part {part}" + (f" ({filename})" if filename else "")


def _decode_all(
    parts: list[tuple[str | None, bytes | str]], image_size: int, channels: int
) -> list[np.ndarray | str]:
    """Each part as the model's uint8 (S, S, C) input, or why it is not (a string without the part's name)."""
    decoded: list[np.ndarray | str] = []
    for part, (filename, data) in enumerate(parts, 1):
        name = _part_name(part, filename)
        if isinstance(data, str):
            decoded.append(data)
        elif not data:
            decoded.append("empty file")
        else:
            try:
                decoded.append(decode_image(io.BytesIO(data), name, image_size, channels))
            except VitlabError as error:
                decoded.append(str(error).removeprefix(f"{name}: "))
    return decoded


class _Server(uvicorn.Server):
    """uvicorn's server, draining the batcher once it stops accepting connections."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher):
        super().__init__(config)
        self.batcher = batcher

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn closes the listening socket before its first await: the batcher, woken by drain(), runs
        # after that, so no request joins while the queue empties; uvicorn then waits for every answer.
        self.batcher.drain()
        await super().shutdown(sockets)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. VitlabError naming host and port when
    the host is unknown or the port taken."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # proto must say TCP (getaddrinfo's, not socket.create_server's 0): asyncio sets TCP_NODELAY only on
        # sockets that do, and without it every answer, headers and body in two writes, waits ~40 ms for the
        # client's delayed ACK (Nagle's algorithm).
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        if sock is not None:
            sock.close()
        raise VitlabError(f"cannot listen on {host}:{port}: {one_line(error)}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """http://host:port of a listening socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, warnings and errors only, with vitlab.serve's lines in the same format."""
    config = json.loads(json.dumps(uvicorn.config.LOGGING_CONFIG))  # a deep copy of plain data
    config["loggers"]["vitlab.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _ignore(signum: int, frame: Any) -> None:
    pass


def run(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    provider: str = "auto",
    threads: int | None = None,
    on_listening: Callable[[str], Any] | None = None,
) -> None:
    """Serve ``model_path`` until SIGTERM or Ctrl-C. The model is loaded (VitlabError if it is missing, not
    ONNX or not vitlab's) and the port opened (OSError if taken) before ``on_listening`` gets the URL (None:
    a line on stdout names it).

    SIGTERM stops accepting connections, answers every request already received, and returns (exit 0);
    Ctrl-C does the same, then raises KeyboardInterrupt. Requests still arriving after ``drain_timeout_s``
    are cut off."""
    settings = settings or ServeSettings()
    path = Path(model_path)
    # Without spinning: between calls, the cores parse requests and decode images. On 2 busy cores, 2 ORT
    # threads that spun took 1.5-2.2x the server's CPU per request and up to 5x the latency (1 or 32
    # connections).
    classifier = Classifier(path, provider=provider, threads=threads, spin=False)
    app = create_app(classifier, path.name, settings)
    sock = listen(host, port)
    config = uvicorn.Config(
        app,
        log_config=_log_config(),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        lifespan="on",
        http="h11",
        loop="asyncio",
    )
    url = url_of(sock)
    if on_listening is None:
        print(f"serving {path} at {url} (API docs: {url}/docs; stop: Ctrl-C or SIGTERM)", flush=True)
    else:
        on_listening(url)
    # uvicorn re-raises the signal that stopped it once it has shut down, so that its default action ends the
    # process (status 143 for SIGTERM); a drained server has done what SIGTERM asks, so it returns instead.
    previous = signal.signal(signal.SIGTERM, _ignore)
    try:
        with sock:
            _Server(config, app.state.batcher).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
