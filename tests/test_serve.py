"""`vitlab serve` as clients see it: a real uvicorn server in a subprocess on a free loopback port, spoken to
over HTTP with httpx. Most tests serve a small untrained ViT exported in a second; the concurrency test also
serves the model of the test session's pipeline run, on its real test images (tests/test_pipeline.py)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving_fixtures import (
    NORM,
    cifar_images,
    class_names,
    export_plain_onnx,
    png_header,
    random_model,
    save_pngs,
)

from vitlab.cli import main
from vitlab.export import export_onnx, quantize_onnx
from vitlab.serve import listen

# ORT computes in float32: logits of a few units carry ~1e-6 of rounding, which differs between batch
# compositions; a probability moves by at most a quarter of its logit's change.
PROBABILITY_TOLERANCE = 1e-5
METADATA = {
    "dataset": "cifar10",
    "model_preset": "tinyvit",
    "params_sha256": "5" * 64,
    "test_accuracy": "0.422",
}


class Server:
    """`vitlab serve MODEL --port 0 OPTIONS...` in a subprocess, ready (its /readyz answers 200)."""

    def __init__(self, model: Path, log: Path, *options: str, env: dict[str, str] | None = None):
        command = [sys.executable, "-m", "vitlab.cli", "serve", str(model), "--port", "0"]
        self.log = log
        self.process = subprocess.Popen(
            [*command, "--provider", "cpu", "--threads", "1", *options],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=env,
        )
        line = self.process.stdout.readline()  # the model loads, the port opens, then this line
        found = re.search(r" at (http://127\.0\.0\.1:(\d+)) ", line)
        assert found, f"no URL in {line!r}; stderr: {log.read_text()}"
        self.url, self.port = found[1], int(found[2])
        self.client = httpx.Client(base_url=self.url, trust_env=False, timeout=120)
        for _ in range(2400):  # the warm-up batch runs after the port opens
            if self.client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"{self.url} never became ready: {log.read_text()}")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics: (name, sorted label items) -> value."""
        text = self.client.get("/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_for_metric(self, name: str, value: float) -> None:
        for _ in range(2400):
            if sample(self.metrics(), name) == value:
                return
            time.sleep(0.05)
        pytest.fail(f"{name} never reached {value}")

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed if it has not exited 2 minutes later)."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


def sample(metrics: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The value of one sample of a ``Server.metrics()`` snapshot; 0 when absent (a counter not yet used)."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def stalled_upload(port: int) -> socket.socket:
    """A connection that sent a /predict request's headers and none of its body: to the server, images on
    their way, so a batch waits for them (up to --max-wait-ms)."""
    sock = socket.create_connection(("127.0.0.1", port))
    headers = b"Host: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n"
    sock.sendall(b"POST /predict HTTP/1.1\r\n" + headers + b"\r\n")
    return sock


def multipart(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def predict_cli(model: Path, paths: list[Path], env: dict[str, str] | None = None) -> dict[str, dict]:
    """What `vitlab predict --json --top-k 10` answers for each file: name -> {label: probability}."""
    files = [str(path) for path in paths]
    done = subprocess.run(
        [sys.executable, "-m", "vitlab.cli", "predict", str(model), *files, "--json", "--top-k", "10"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    return {
        Path(p["path"]).name: dict(zip(p["labels"], p["probabilities"], strict=True))
        for p in json.loads(done.stdout)["predictions"]
    }


def assert_same_answer(answer: dict, expected: dict[str, float]) -> None:
    """``answer`` (one image of /predict) is ``expected``'s top classes, with its probabilities."""
    k = len(answer["labels"])
    assert answer["error"] is None and k == len(answer["probabilities"]) > 0
    assert answer["probabilities"] == sorted(answer["probabilities"], reverse=True)
    for label, probability in zip(answer["labels"], answer["probabilities"], strict=True):
        assert probability == pytest.approx(expected[label], abs=PROBABILITY_TOLERANCE), label
    # The k-th best here is no lower than the best left out, to float precision (a tie may swap them).
    left_out = [p for label, p in expected.items() if label not in answer["labels"]]
    assert max(left_out, default=0.0) <= answer["probabilities"][-1] + PROBABILITY_TOLERANCE


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    return export_onnx(random_model("vit"), path, class_names(), NORM, metadata=METADATA)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """40 CIFAR-10 test images as PNG, a JPEG, and a 100x60 grayscale PNG (cropped and resized to 32x32)."""
    folder = tmp_path_factory.mktemp("images")
    pixels, _ = cifar_images(40)
    paths = save_pngs(pixels, folder)
    Image.fromarray(pixels[0]).save(folder / "photo.jpg", quality=90)
    gradient = np.add.outer(np.arange(60), np.arange(100)).astype(np.uint8)
    Image.fromarray(gradient).save(folder / "wide-gray.png")
    return [*paths, folder / "photo.jpg", folder / "wide-gray.png"]


@pytest.fixture(scope="module")
def expected(model, images) -> dict[str, dict]:
    return predict_cli(model, images)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    served = Server(model, tmp_path_factory.mktemp("log") / "server.log", "--max-body-mb", "1")
    yield served
    assert served.stop() == 0


def test_every_endpoint_answers(server, model):
    client = server.client
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}

    meta = client.get("/metadata").json()
    assert meta["class_names"] == class_names() and meta["model"] == "model.onnx"
    assert (meta["image_size"], meta["channels"], meta["arch"], meta["preset"]) == (32, 3, "vit", "tinyvit")
    assert meta["mean"] == list(NORM.mean) and meta["std"] == list(NORM.std)
    assert meta["test_accuracy"] == 0.422 and meta["params_sha256"] == "5" * 64
    assert meta["input_layout"].startswith("NCHW float32 RGB 32x32") and meta["config"]["depth"] == 2
    assert meta["providers"] == ["CPUExecutionProvider"]
    assert meta["limits"] == {
        "max_batch": 64,
        "max_wait_ms": 5.0,
        "queue_images": 1024,
        "max_body_bytes": 2**20,
        "max_pixels": 64_000_000,
    }

    schema = client.get("/openapi.json").json()
    assert {"/predict", "/metadata", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "image/*", "application/octet-stream"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "swagger" in docs.text.lower()

    before = server.metrics()
    pixels, _ = cifar_images(1)
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    assert client.post("/predict", content=png.getvalue(), headers={"content-type": "image/png"}).is_success
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    after = server.metrics()

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("vitlab_http_requests_total", path="/predict", status="200") == 1
    assert grew("vitlab_http_requests_total", path="/metadata", status="200") == 0
    assert grew("vitlab_images_total", outcome="classified") == 1
    assert grew("vitlab_batch_size_count") == 1 and grew("vitlab_batch_size_sum") == 1
    assert grew("vitlab_batch_size_bucket", le="1.0") == 1
    assert grew("vitlab_http_request_duration_seconds_count", path="/predict") == 1
    assert grew("vitlab_inference_seconds_count") == 1
    assert sample(after, "vitlab_queue_images") == sample(after, "vitlab_requests_incoming") == 0


def test_predict_gives_the_answers_of_vitlab_predict_in_the_order_sent(server, images, expected):
    answer = server.client.post("/predict", files=multipart(images), params={"top_k": 10})
    assert answer.status_code == 200 and answer.json()["detail"] is None
    predictions = answer.json()["predictions"]
    assert [(p["part"], p["filename"]) for p in predictions] == [(i, p.name) for i, p in enumerate(images, 1)]
    for prediction, path in zip(predictions, images, strict=True):
        assert_same_answer(prediction, expected[path.name])

    for path in (images[3], images[-2], images[-1]):  # raw bytes: a PNG, a JPEG, a grayscale PNG
        for media_type in ("image/png", "application/octet-stream"):
            headers = {"content-type": media_type}
            raw = server.client.post("/predict", content=path.read_bytes(), headers=headers)
            (prediction,) = raw.json()["predictions"]
            assert (prediction["part"], prediction["filename"], len(prediction["labels"])) == (1, None, 3)
            assert_same_answer(prediction, expected[path.name])


@pytest.mark.parametrize("variant", ["int8", "attention"])
def test_the_int8_and_attention_models_are_served_as_vitlab_predict_runs_them(
    variant, model, images, tmp_path
):
    if variant == "int8":
        served_model = quantize_onnx(model, tmp_path / "model.int8.onnx")
    else:  # the ViT with its attention weights as a second output
        path = tmp_path / "attention.onnx"
        served_model = export_onnx(random_model("vit"), path, class_names(), NORM, with_attention=True)
    expected = predict_cli(served_model, images[:4])
    served = Server(served_model, tmp_path / "server.log")
    try:
        answer = served.client.post("/predict", files=multipart(images[:4]), params={"top_k": 10})
        for prediction, path in zip(answer.json()["predictions"], images[:4], strict=True):
            assert_same_answer(prediction, expected[path.name])
        quantization = served.client.get("/metadata").json()["quantization"]
        if variant == "int8":
            assert quantization.startswith("weight_only int8")
        else:
            assert quantization is None
    finally:
        assert served.stop() == 0


def test_each_error_has_its_status_a_one_line_reason_and_one_log_line(server, images, expected):
    client, log_lines = server.client, len(server.log_lines())
    answers = []

    def post(**kwargs) -> httpx.Response:
        answers.append(client.post("/predict", **kwargs))
        return answers[-1]

    text = post(content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415 and "unsupported media type 'text/plain'" in text.json()["detail"]
    assert post(content=b"hello").status_code == 415  # no content type at all

    files = [
        ("files", (images[0].name, images[0].read_bytes(), "image/png")),
        ("files", ("notes.png", b"not an image", "image/png")),
        ("files", ("bomb.png", png_header(10_000, 9_000), "image/png")),
        ("files", ("empty.png", b"", "image/png")),
        ("files", (images[1].name, images[1].read_bytes(), "image/png")),
    ]
    mixed = post(files=files, data={"caption": "a cat"})
    assert mixed.status_code == 422
    predictions = mixed.json()["predictions"]
    assert [p["error"] for p in predictions] == [
        "field 'caption' is text, not a file (curl: -F 'caption=@photo.jpg')",  # httpx sends fields first
        None,
        "not an image Pillow can read",
        "10000x9000 image exceeds the 64,000,000-pixel limit",
        "empty file",
        None,
    ]
    assert [p["filename"] for p in predictions] == [None, *(name for _, (name, _, _) in files)]
    assert_same_answer(predictions[1], expected[images[0].name])
    assert_same_answer(predictions[5], expected[images[1].name])
    assert mixed.json()["detail"].startswith(
        "4 of 6 images could not be classified: part 1: field 'caption' is text, not a file (curl: -F "
        "'caption=@photo.jpg'); part 3 (notes.png): not an image Pillow can read; part 4 (bomb.png): "
    )
    raw = post(content=b"\x89PNG\r\n\x1a\ntruncated", headers={"content-type": "image/png"})
    assert raw.status_code == 422 and raw.json()["detail"].startswith("1 of 1 images could not be classified")

    too_large, png = b"\0" * (2**20 + 1), {"content-type": "image/png"}
    declared = post(content=too_large, headers=png)
    chunked = post(content=iter([too_large[: 2**19], too_large[2**19 :]]), headers=png)
    for answer in (declared, chunked):
        assert answer.status_code == 413
        assert answer.json() == {"detail": "request body over the 1 MiB limit (--max-body-mb)"}

    no_boundary = post(content=b"x", headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["detail"].lower()
    empty = post(content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"})
    assert empty.status_code == 400 and empty.json() == {"detail": "no image in the request"}
    bad_k = post(files=files[:1], params={"top_k": 0})
    assert bad_k.status_code == 422  # one line, as every error answer: not FastAPI's list of error objects
    assert bad_k.json()["detail"] == "query.top_k: Input should be greater than or equal to 1"
    answers.append(client.get("/nowhere"))
    assert answers[-1].status_code == 404

    assert all("Traceback" not in a.text for a in answers)
    new_lines = server.log_lines()[log_lines:]
    assert [line.split(":", 1)[1].split()[0] for line in new_lines] == [str(a.status_code) for a in answers]
    assert new_lines[0] == (
        "WARNING:  415 POST /predict: unsupported media type 'text/plain': send multipart/form-data files or "
        "one image's bytes (image/*, application/octet-stream)"
    )
    assert "query.top_k: Input should be greater than or equal to 1" in new_lines[-2]
    assert sample(server.metrics(), "vitlab_http_requests_total", path="other", status="404") == 1


def test_a_full_queue_answers_503_then_recovers_and_a_batch_gathers_waiting_requests(
    model, images, expected, tmp_path
):
    # Batches wait up to 10 minutes for an upload that never ends: the queue fills, deterministically.
    served = Server(model, tmp_path / "server.log", "--queue", "8", "--max-wait-ms", "600000")
    try:
        stall = stalled_upload(served.port)
        served.wait_for_metric("vitlab_requests_incoming", 1)
        with ThreadPoolExecutor(2) as pool:
            sent = [images[0:4], images[4:8]]
            waiting = [pool.submit(served.client.post, "/predict", files=multipart(s)) for s in sent]
            served.wait_for_metric("vitlab_queue_images", 8)
            full = served.client.post("/predict", files=multipart(images[8:9]))
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["detail"].startswith("queue full: 8 images waiting, 1 more would pass")
            too_many = served.client.post("/predict", files=multipart(images[:9]))
            assert too_many.status_code == 400  # more than the queue holds, ever
            assert not any(f.done() for f in waiting)
            stall.close()  # nothing else on its way: the batch closes with both requests
            answers = [f.result().json()["predictions"] for f in waiting]
        for answer, paths in zip(answers, sent, strict=True):
            for prediction, path in zip(answer, paths, strict=True):
                assert_same_answer(prediction, expected[path.name])
        batches = served.metrics()
        assert (sample(batches, "vitlab_batch_size_count"), sample(batches, "vitlab_batch_size_sum")) == (
            1,
            8,
        )

        again = served.client.post("/predict", files=multipart(images[8:16]))  # the whole queue again
        assert again.status_code == 200
        for prediction, path in zip(again.json()["predictions"], images[8:16], strict=True):
            assert_same_answer(prediction, expected[path.name])
        assert sample(served.metrics(), "vitlab_http_requests_total", path="/predict", status="503") == 1
    finally:
        assert served.stop() == 0


def test_sigterm_answers_every_queued_request_then_exits_0(model, images, expected, tmp_path):
    served = Server(model, tmp_path / "server.log", "--max-wait-ms", "600000")
    try:
        stall = stalled_upload(served.port)
        served.wait_for_metric("vitlab_requests_incoming", 1)
        sent = [images[0:1], images[1:3], images[3:6]]
        with ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(served.client.post, "/predict", files=multipart(s)) for s in sent]
            served.wait_for_metric("vitlab_queue_images", 6)
            served.process.send_signal(signal.SIGTERM)
            answers = [f.result() for f in waiting]  # answered while the stalled upload holds the batch open
        for answer, paths in zip(answers, sent, strict=True):
            assert answer.status_code == 200
            for prediction, path in zip(answer.json()["predictions"], paths, strict=True):
                assert_same_answer(prediction, expected[path.name])
        with pytest.raises(ConnectionRefusedError):  # it stopped accepting before it answered them
            socket.create_connection(("127.0.0.1", served.port))
        assert served.process.poll() is None  # still waiting for the upload
        stall.close()
        assert served.process.wait(timeout=120) == 0
        assert "Traceback" not in served.log.read_text()
    finally:
        served.stop()


@pytest.mark.parametrize("problem", ["missing", "not ONNX", "not vitlab's"])
def test_a_bad_model_fails_at_start_with_one_line_before_the_port_opens(problem, tmp_path, capfd):
    path = tmp_path / "model.onnx"
    if problem == "not ONNX":
        path.write_bytes(b"\x08\x07garbage")
    elif problem == "not vitlab's":
        export_plain_onnx(random_model("mlp"), (1, 3, 32, 32), path)
    capfd.readouterr()
    assert main(["serve", str(path), "--port", "0"]) == 2
    out, err = capfd.readouterr()
    assert out == ""  # no URL: the port never opened
    message = {
        "missing": "no such model file",
        "not ONNX": "not a loadable ONNX model",
        "not vitlab's": "no valid vitlab metadata",
    }[problem]
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1


def test_connections_send_without_waiting_for_acks():
    """asyncio turns Nagle's algorithm off only on sockets whose proto says TCP: with it on, every answer
    (headers and body, two writes) waited ~40 ms for the client's delayed ACK."""

    async def nodelay_of_an_accepted_connection() -> int:
        sock = listen("127.0.0.1", 0)
        accepted = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(
                writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            )
            writer.close()

        async with await asyncio.start_server(handle, sock=sock):
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            nodelay = await accepted
            writer.close()
        return nodelay

    assert asyncio.run(nodelay_of_an_accepted_connection()) == 1


def test_a_port_in_use_is_one_line(model, capfd):
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        capfd.readouterr()
        assert main(["serve", str(model), "--port", str(port)]) == 2
    assert capfd.readouterr() == ("", f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n")


async def _clients(url: str, files: dict[str, bytes], clients: int, requests: int, seed: int) -> list:
    """``clients`` concurrent clients, each sending ``requests`` requests of 1-8 of the files, one after the
    other: [(names sent, answer)]."""
    rng, names = np.random.default_rng(seed), sorted(files)
    plans = [[list(rng.choice(names, rng.integers(1, 9))) for _ in range(requests)] for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=300, limits=limits) as client:

        async def one_client(plan: list[list[str]]) -> list[tuple[list[str], httpx.Response]]:
            done = []
            for sent in plan:
                parts = [("files", (name, files[name], "image/png")) for name in sent]
                done.append((sent, await client.post("/predict", files=parts, params={"top_k": 10})))
            return done

        return [pair for done in await asyncio.gather(*map(one_client, plans)) for pair in done]


def check_concurrent_clients(server: Server, paths: list[Path], expected: dict, clients: int, requests: int):
    files = {p.name: p.read_bytes() for p in paths}
    before = server.metrics()
    done = asyncio.run(_clients(server.url, files, clients, requests, seed=0))
    assert len(done) == clients * requests
    for sent, answer in done:
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert [p["filename"] for p in predictions] == sent
        for prediction, name in zip(predictions, sent, strict=True):
            assert_same_answer(prediction, expected[name])
    after = server.metrics()
    images = sum(len(sent) for sent, _ in done)
    batched, batches = (
        sample(after, n) - sample(before, n) for n in ("vitlab_batch_size_sum", "vitlab_batch_size_count")
    )
    # Requests never split: every image once, in at most one batch per request.
    assert batched == images and batches <= len(done)


def test_concurrent_clients_each_get_their_own_answers(server, images, expected):
    check_concurrent_clients(server, images, expected, clients=16, requests=5)
