"""DAST: the registered model served by a real `mlflow models serve` on loopback, sent hostile requests.

Every hostile request must get a 4xx naming what was wrong within TIME_LIMIT_S, the server must
still answer good requests afterwards, and its peak memory must stay under PEAK_RSS_LIMIT.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from components.models import serving
from components.artifacts import dataset
from helpers import free_port

TIME_LIMIT_S = 20
PEAK_RSS_LIMIT = 3 * 2**30  # all processes of the server together; about 0.9 GB at rest here


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge greyscale canvas (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def _body(rows: list[bytes], columns=("image",)) -> bytes:
    data = [[base64.b64encode(r).decode()] * len(columns) for r in rows]
    return json.dumps({"dataframe_split": {"columns": list(columns), "data": data}}).encode()


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, str, float]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=TIME_LIMIT_S * 3) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    return status, text, time.perf_counter() - start


def _wait_until_serving(url: str, proc, log: Path, timeout: float = 120) -> None:
    """Until the scoring server answers /ping; its log's tail if it dies or never answers."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.fixture
def served(trained, tmp_path):
    """The fine-tuned model registered as the pipeline registers it, served on loopback."""
    from local_stack import stop

    store = f"sqlite:///{tmp_path / 'serve.db'}"
    mlflow.set_tracking_uri(store)
    examples = [p for p, *_ in dataset.images(trained / "data", "test")][:2]
    with mlflow.start_run():
        info = serving.log_model(trained / "model" / "model.pt", [p.read_bytes() for p in examples])
    version = mlflow.register_model(info.model_uri, "dast").version
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/dast/{version}", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # uvicorn
             "MLFLOW_TRACKING_URI": store, "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(TIME_LIMIT_S)})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(url, proc, tmp_path / "serve.log")
        yield url, proc, examples
    finally:
        stop(proc.pid)
        proc.wait()


def test_hostile_requests_get_a_clear_4xx_in_time_and_the_server_lives_in_bounded_memory(served):
    url, proc, examples = served
    good = _body([p.read_bytes() for p in examples])
    status, text, _ = _post(url, good)
    assert status == 200, text
    labels = [row["label"] for row in json.loads(text)["predictions"]]
    assert len(labels) == 2

    tiny = _png(Image.new("RGB", (8, 8), (200, 10, 10)))
    photo = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    big = _png(Image.new("L", (6000, 6000)))  # 36 Mpx of zeros: ~100 kB encoded, 108 MB decoded as RGB
    hostile = {
        "not an image": (_body([b"hello, I am not an image"]), "image 0: not a recognised image format"),
        "text in a pdf's clothes": (_body([tiny, b"%PDF-1.4 nothing"]), "image 1: not a recognised image format"),
        "truncated image": (_body([photo[: len(photo) // 2]]), "image 0: truncated or corrupt image data"),
        "decompression bomb": (_body([_png_declaring(50_000, 50_000)]), "image 0: decompression bomb"),
        "bomb under Pillow's limit": (_body([_png(Image.new("L", (8000, 6000)))]),
                                      f"image 0: 8000x6000 pixels; at most {serving.MAX_IMAGE_PIXELS}"),
        "many large images": (_body([big] * 6), f"at most {serving.MAX_REQUEST_PIXELS}"),
        "50 MB body": (_body([os.urandom(38 * 2**20)]), f"at most {serving.MAX_REQUEST_BYTES}"),
        "wrong column": (_body([tiny], columns=("img",)), "image"),
        "number, not bytes": (json.dumps({"dataframe_split": {"columns": ["image"], "data": [[7]]}}).encode(), ""),
        "thousands of rows": (_body([tiny] * 5000), f"5000 images in one request; at most {serving.MAX_ROWS}"),
        "empty request": (_body([]), ""),
        "not JSON": (b"{" * 100_000, ""),
        "not an image, inputs form": (json.dumps({"inputs": {"image": [base64.b64encode(photo[:200] + b"x" * 12000)
                                                                       .decode()]}}).encode(),
                                      "image 0: truncated or corrupt image data"),
    }
    answers = {}
    for kind, (body, expected) in hostile.items():
        status, text, seconds = _post(url, body)
        answers[kind] = (status, seconds, text[:300])
        assert 400 <= status < 500, f"{kind}: {status} {text[:500]}"
        assert expected in text, f"{kind}: {text[:500]}"
        if expected:  # the model's refusals: one line, not the request back (MLflow's own JSON error echoes it)
            assert len(text) < 1000, f"{kind}: {len(text)} characters: {text[:500]}"
        assert seconds < TIME_LIMIT_S, f"{kind}: answered in {seconds:.1f} s"
        assert proc.poll() is None, f"server died on: {kind}"
    status, text, _ = _post(url, tiny, content_type="image/png")
    assert status == 415, text

    status, text, _ = _post(url, good)  # still serving, and still the same answers
    assert status == 200 and [row["label"] for row in json.loads(text)["predictions"]] == labels
    from local_stack import session_peak_rss

    peak = session_peak_rss(os.getsid(proc.pid))
    print(f"peak RSS {peak / 2**20:.0f} MiB; "
          + "; ".join(f"{k}: {s} in {t:.2f} s" for k, (s, t, _) in answers.items()))
    assert 0 < peak < PEAK_RSS_LIMIT


def test_limits_apply_in_process_too():
    """The pyfunc itself refuses what is over a limit before decoding a pixel (no server needed)."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="decompression bomb"):
        serving._rows([_png_declaring(50_000, 50_000)])
    with pytest.raises(MlflowException, match="image 1: 7000x7000 pixels"):
        serving._rows([_png(Image.new("L", (4, 4))), _png_declaring(7000, 7000)])
    values = [_png(Image.new("RGB", (4000, 3000)))] * 9  # 12 Mpx each, 108 Mpx in all
    chunks = [indices for indices, _ in serving._chunks(serving._rows(values))]
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # CHUNK_PIXELS = 50 Mpx decoded at a time


@pytest.mark.parametrize("per_request, most_at_once", [(40, 40), (2, 16)])
def test_concurrent_requests_hold_at_most_a_batch_of_images_in_forward_passes_and_get_their_own_answers(
        trained, per_request, most_at_once):
    """The scoring server predicts each request in a thread of its own; the model admits at most one batch
    (64) of images into forward passes at once, in arrival order: two 40-image requests never overlap (the
    activations of one batch, not one per request in flight), eight 2-image requests all may. Each thread
    still gets the predictions for its own images."""
    model = serving.ImageClassifier.from_checkpoint(trained / "model" / "model.pt")
    tests = [dataset.read_bytes(image) for image in dataset.images(trained / "data", "test")]
    requests = [__import__("pandas").DataFrame({"image": [tests[(i + j) % len(tests)] for j in range(per_request)]})
                for i in range(8)]
    alone = [model.predict(None, r) for r in requests]
    forward, state, guard = model.module.forward, {"inside": 0, "most": 0}, threading.Lock()

    def counted(x):
        with guard:
            state["inside"] += len(x)
            state["most"] = max(state["most"], state["inside"])
        try:
            time.sleep(0.5)  # the other threads arrive meanwhile
            return forward(x)
        finally:
            with guard:
                state["inside"] -= len(x)

    model.module.forward = counted
    answers = [None] * len(requests)

    def ask(i):
        answers[i] = model.predict(None, requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["most"] == most_at_once
    for a, b in zip(answers, alone):
        assert list(a["label"]) == list(b["label"])
        np.testing.assert_allclose(a["confidence"], b["confidence"], rtol=1e-5)


def _readme_serve_section() -> tuple[list[str], str]:
    """The README's "Serve the champion" shell block, one command per entry (continuations joined), and its
    Python client."""
    from helpers import ROOT

    text = (ROOT / "README.md").read_text().split("<!-- serve:", 1)[1]
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    client = text.split("```python\n", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()], client


@pytest.mark.e2e
def test_the_readmes_serve_commands_answer_a_real_photograph_with_its_class(imagenet_zoo, tmp_path):
    """The commands and the Python client as written (the store, the port and the image file put where they
    say), against a champion registered under the README's name: real ImageNet weights (efficientnet_lite0,
    pipelines/imagenet_zoo.py) and a real photograph (scikit-image's cat) put at the README's image path.
    The class the model gives it in-process comes back, and it is a cat."""
    import skimage.data
    import torch

    from components.artifacts import checkpoint
    from local_stack import stop

    (activate, serve_cmd, curl_cmd), client = _readme_serve_section()
    assert activate == ". .venv/bin/activate"
    model_name = serve_cmd.split('models:/', 1)[1].split("@", 1)[0]
    image_path = curl_cmd.split("base64 -w0 ", 1)[1].split(")", 1)[0]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    zoo = torch.load(imagenet_zoo, map_location="cpu", weights_only=True)
    model_file = tmp_path / "model.pt"  # the zoo's network as a fine-tune writes one: with its preprocessing
    checkpoint.save(checkpoint.Checkpoint(zoo["arch"], zoo["class_names"], zoo["state_dict"],
                                          {"image_size": 224, "mean": [0.485, 0.456, 0.406],
                                           "std": [0.229, 0.224, 0.225]}, library=zoo["library"]), model_file)
    photo = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(photo, format="JPEG", quality=90)
    with mlflow.start_run():
        info = serving.log_model(model_file, [photo.getvalue()])
    version = mlflow.register_model(info.model_uri, model_name).version
    mlflow.MlflowClient().set_registered_model_alias(model_name, "champion", version)
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert {r.split("==")[0] for r in serving.requirements()} >= {"torch", "pillow", "pandas"}
    assert all("==" in r for r in serving.requirements())
    work = tmp_path / "work"  # the project as the README assumes it: .venv here, the image at its path
    (work / image_path).parent.mkdir(parents=True)
    (work / image_path).write_bytes(photo.getvalue())  # a JPEG where the README's command reads its image
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    expected = model.predict(__import__("pandas").DataFrame({"image": [photo.getvalue()]}))["label"][0]
    assert expected in ("tabby", "tiger cat", "Egyptian cat")
    port = str(free_port())
    serve_line = serve_cmd.removesuffix("&").replace("sqlite:///mlflow.db", store).replace("5001", port)
    log = open(tmp_path / "serve.log", "w")
    # a user's shell: no virtualenv on PATH until the README's first line activates it
    venv_bin = str(Path(sys.executable).parent)
    user_path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d != venv_bin)
    user_env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")},
                "PATH": user_path}
    proc = subprocess.Popen(["bash", "-c", f"{activate} && exec env {serve_line}"], cwd=work, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=user_env)
    try:
        _wait_until_serving(f"http://127.0.0.1:{port}", proc, tmp_path / "serve.log")
        answer = subprocess.run(["bash", "-c", curl_cmd.replace("5001", port)], cwd=work, capture_output=True,
                                text=True, timeout=60)
        predictions = json.loads(answer.stdout)["predictions"]
        assert [p["label"] for p in predictions] == [expected], answer.stdout
        assert 0 < predictions[0]["confidence"] <= 1
        printed = subprocess.run([sys.executable, "-c", client.replace("5001", port)], cwd=work, capture_output=True,
                                 text=True, timeout=60)
        assert printed.returncode == 0, printed.stderr
        assert [p["label"] for p in ast.literal_eval(printed.stdout)] == [expected]  # the Python client too
    finally:
        stop(proc.pid)
        proc.wait()
        log.close()
