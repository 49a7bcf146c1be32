"""The model as the registry serves it: image files in, class names out.

An MLflow pyfunc whose input (and signature) is a column `image` of encoded image bytes (PNG,
JPEG, ... as read from a file, or base64 in a serving request). In-process, a list of decoded
uint8 RGB images works too: `mlflow.pyfunc.load_model(uri).unwrap_python_model().predict(None, images)`.
Decoding, resizing and normalisation happen inside, exactly as validate measured them, so a served model sees what
the evaluated one saw. The weights travel as the checkpoint (loaded with weights_only=True).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from torchvision.transforms.v2 import functional as TF

from components.models import architectures

BATCH = 64

# What one request may ask of the served model. Past these it gets a 400 naming the limit instead
# of the server's memory or time: decoded images are what costs (a small PNG can declare a huge
# canvas), so pixels are counted from the headers before anything is decoded, and images are
# decoded a chunk at a time. Split bigger jobs into several requests.
MAX_ROWS = 512
MAX_REQUEST_BYTES = 32 * 2**20          # encoded image bytes in one request
MAX_IMAGE_PIXELS = 40_000_000           # one image (a 7300x5500 photo)
MAX_REQUEST_PIXELS = 200_000_000        # all images of one request
CHUNK_PIXELS = 50_000_000               # decoded at a time


class RequestError(mlflow.exceptions.MlflowException):
    """A request the model refuses: HTTP 400 from the scoring server, with our one line as its message.
    The server puts the whole request in front of a prediction's error (mlflow 3.17.2,
    pyfunc/scoring_server/__init__.py:361: `Failed to predict data '{data}'. \nError: ...`): a 12 kB
    image echoed back, or more. That prefix is dropped when the server sets it."""

    ECHO = "Failed to predict data "

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self._message = value.rpartition("\nError: ")[2] if value.startswith(self.ECHO) else value


def _invalid(message: str) -> RequestError:
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return RequestError(message, error_code=INVALID_PARAMETER_VALUE)


def _unwrapped(value):
    """An image as the request held it. The scoring server decodes base64 for the `dataframe_split` and
    `dataframe_records` forms but passes `inputs` and `instances` through as the base64 text: decode it here.
    (Encoded images are never valid base64 themselves: PNG, JPEG, GIF, WebP headers hold other bytes.)"""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, (bytes, bytearray, np.bytes_)):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return bytes(value)


def _rows(model_input) -> list:
    """The request's images, checked against the limits above; raises a 400-kind error saying which."""
    from components.storage.images import declared_size

    if hasattr(model_input, "columns") or isinstance(model_input, dict):  # a DataFrame, or `inputs` by column
        columns = list(model_input.columns if hasattr(model_input, "columns") else model_input)
        if "image" not in columns:
            raise _invalid(f"expected a column 'image' of encoded image bytes, got {columns}")
        values = [_unwrapped(v) for v in model_input["image"]]
    else:
        values = [_unwrapped(v) for v in model_input]
    if not values:
        raise _invalid("no images in the request")
    if len(values) > MAX_ROWS:
        raise _invalid(f"{len(values)} images in one request; at most {MAX_ROWS} (split the request)")
    encoded = sum(len(v) for v in values if isinstance(v, (bytes, bytearray)))
    if encoded > MAX_REQUEST_BYTES:
        raise _invalid(f"{encoded} bytes of images in one request; at most {MAX_REQUEST_BYTES} (split the request)")
    pixels = 0
    for i, value in enumerate(values):
        if isinstance(value, (bytes, bytearray)):
            try:
                width, height = declared_size(bytes(value))
            except ValueError as err:
                raise _invalid(f"image {i}: {err}") from None
        else:
            array = np.asarray(value)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise _invalid(f"image {i}: expected encoded bytes or a uint8 (H, W, 3) array, "
                               f"got {array.dtype} {array.shape}")
            height, width = array.shape[:2]
        if width * height > MAX_IMAGE_PIXELS:
            raise _invalid(f"image {i}: {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} per image")
        pixels += width * height
    if pixels > MAX_REQUEST_PIXELS:
        raise _invalid(f"{pixels} pixels in one request; at most {MAX_REQUEST_PIXELS} (split the request)")
    return values


def _decoded(value, i: int) -> np.ndarray:
    from components.storage.images import decode

    if not isinstance(value, (bytes, bytearray)):
        return np.asarray(value)
    try:
        return np.asarray(decode(bytes(value), max_pixels=MAX_IMAGE_PIXELS))
    except ValueError as err:
        raise _invalid(f"image {i}: {err}") from None


def _chunks(values: list):
    """(indices, decoded images) a chunk at a time: at most BATCH images and CHUNK_PIXELS pixels."""
    indices, images, pixels = [], [], 0
    for i, value in enumerate(values):
        image = _decoded(value, i)
        if images and (len(images) == BATCH or pixels + image.shape[0] * image.shape[1] > CHUNK_PIXELS):
            yield indices, images
            indices, images, pixels = [], [], 0
        indices.append(i)
        images.append(image)
        pixels += image.shape[0] * image.shape[1]
    if images:
        yield indices, images


class ImageSlots:
    """At most `size` images in forward passes at once in this process, admitted in arrival order.

    MLflow's scoring server runs each request's predict in a thread of its own (mlflow 3.17.2,
    pyfunc/scoring_server/__init__.py:496, asyncio.to_thread: up to min(32, CPUs + 4) at once, CPython
    3.11 concurrent/futures/thread.py:142). Single images gain from overlapping passes, but concurrent
    64-image batches only multiply the activations held (about 0.6 GB each at 224 px) and contend for the
    same cores. benchmarks/serve_load.py, one worker, 32 clients: unbounded 23 single images/s and 29
    photos/s in batches (4.7 GB, 504s past MLflow's 60 s); one pass at a time 18 and 41; these slots 26 and
    42 (2.6 GB, no error)."""

    def __init__(self, size: int):
        self.size, self.free = size, size
        self._turns: collections.deque = collections.deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        n, me = min(n, self.size), object()
        with self._changed:
            self._turns.append(me)  # first come, first served: a batch is not starved by single images
            self._changed.wait_for(lambda: self._turns[0] is me and self.free >= n)
            self._turns.popleft()
            self.free -= n
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self.free += n
                self._changed.notify_all()


class ServedClassifier(torch.nn.Module):
    """What the registry serves: uint8 images (N, H, W, 3) in, class probabilities out.

    Preprocessing lives inside, so a served model resizes and normalises exactly as
    evaluation did.
    """

    def __init__(self, net: nn.Module, image_size: int, mean, std, class_names: list[str]):
        super().__init__()
        self.net = net.eval()
        self.image_size = image_size
        self.class_names = list(class_names)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)
        x = TF.resize(x, [self.image_size], antialias=True)
        x = TF.center_crop(x, [self.image_size, self.image_size])
        x = (x.float() / 255.0 - self.mean) / self.std
        return torch.softmax(self.net(x), dim=1)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self._load(context.artifacts["checkpoint"])

    def _load(self, path: str | Path) -> None:
        from components.artifacts import checkpoint

        ckpt = checkpoint.load(path)
        net = architectures.build(ckpt.arch, len(ckpt.class_names), ckpt.library)
        architectures.load_weights(net, ckpt.state_dict, ckpt.arch)
        prep = ckpt.preprocessing
        self.class_names = list(ckpt.class_names)
        self.module = ServedClassifier(net, prep["image_size"], prep["mean"], prep["std"], self.class_names)
        self._slots = ImageSlots(BATCH)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> "ImageClassifier":
        model = cls()
        model._load(checkpoint)
        return model

    def predict_proba(self, images: list[np.ndarray]) -> np.ndarray:
        """Class probabilities, one row per image, in input order; same-size images share a batch."""
        out = np.zeros((len(images), len(self.class_names)), dtype=np.float32)
        by_shape: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(img.shape, []).append(i)
        with torch.no_grad():
            for indices in by_shape.values():
                for start in range(0, len(indices), BATCH):
                    chunk = indices[start:start + BATCH]
                    batch = torch.from_numpy(np.stack([images[i] for i in chunk]))
                    with self._slots.hold(len(chunk)):
                        out[chunk] = self.module(batch).numpy()
        return out

    def predict(self, context, model_input: pd.DataFrame, params=None):
        # The logged signature describes the input. A DataFrame hint is one MLflow infers no schema from
        # (mlflow 3.17.2, types/type_hints.py: type_hints_no_signature_inference), so it neither coerces the
        # input by it nor warns, at every import, that predict has no hints. In-process, a list of decoded
        # images works too.
        values = _rows(model_input)
        probs = np.zeros((len(values), len(self.class_names)), dtype=np.float32)
        for indices, images in _chunks(values):
            probs[indices] = self.predict_proba(images)
        best = probs.argmax(axis=1)
        return pd.DataFrame({"label": [self.class_names[i] for i in best],
                             "confidence": probs[np.arange(len(best)), best].astype(float)})


def log_model(checkpoint: Path, examples: list[bytes], name: str = "model"):
    """Log the checkpoint as an ImageClassifier pyfunc in the active run (`examples`: encoded images for
    its input example); returns MLflow's ModelInfo. The model carries components/ as its code."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                               outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence")]))
    example = pd.DataFrame({"image": list(examples)})
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(Path(__file__).parent / "pyfunc_entry.py"),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(__file__).parents[1])], signature=signature, input_example=example,
        pip_requirements=requirements())


def requirements() -> list[str]:
    """What the served model imports, pinned to the versions that trained it (a new environment built from
    them decodes and predicts as validate did)."""
    from importlib.metadata import version

    names = ("torch", "torchvision", "timm", "mlflow", "pillow", "pandas", "numpy")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]
