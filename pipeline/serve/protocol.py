"""clip-retrieval's ``clip back`` HTTP API: what a request may hold, and the errors a bad one gets.

The request and response shapes follow clip-retrieval 2.45 (``clip_retrieval/clip_back.py`` and the
``ClipClient`` in ``clip_client.py``), so its client and code written against the LAION kNN service
(knn.laion.ai, gone since 2024) work unchanged against this service:

* ``POST /knn-service`` with a JSON object: one query (``text``, ``image`` as base64, ``image_url`` or
  ``embedding_input``; the first present wins, in that order, as in clip back), ``modality``
  (``image``: search the images, ``text``: the captions), ``num_images`` (results returned with
  their metadata), ``num_result_ids`` (results searched; default ``num_images``), ``indice_name``,
  ``deduplicate``. The answer is a list of ``{"url", "caption", "id", "similarity"}``, best first;
  results past ``num_images`` carry ``id`` and ``similarity`` only, as clip back's do.
* ``POST /metadata`` with ``{"ids": [...], "indice_name": ...}``: ``[{"id", "metadata": {...}}]``.
* ``GET /indices-list``: the served names.

clip back would answer a malformed request with a server error (a ``KeyError`` in the handler); here
each gets a 4xx status with a message that names the field, and the replica goes on serving.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

MODALITIES = ("image", "text")


class BadRequest(Exception):
    """A request the service refuses, with the HTTP status to answer it with (400, 404 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; bounds every replica's work and memory per request."""

    max_results: int = 10_000
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000


@dataclass(frozen=True)
class KnnRequest:
    """One parsed ``/knn-service`` request; exactly one of the four query fields is set."""

    indice_name: str
    modality: str
    num_images: int
    num_result_ids: int
    deduplicate: bool
    text: str | None = None
    image: bytes | None = None
    image_url: str | None = None
    embedding: tuple[float, ...] | None = None


def _count(data: dict[str, Any], name: str, default: int | None, limits: Limits) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {value!r}")
    if not 1 <= value <= limits.max_results:
        raise BadRequest(f"{name} must be between 1 and {limits.max_results}, got {value}")
    return value


def _flag(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool | int):
        raise BadRequest(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _image_bytes(encoded: Any, limits: Limits) -> bytes:
    if not isinstance(encoded, str):
        raise BadRequest("image must be a base64 string")
    if len(encoded) > limits.max_image_bytes * 4 // 3 + 4:
        raise BadRequest(f"image is over {limits.max_image_bytes} bytes", status=413)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"image is not valid base64: {exc}") from exc


def _embedding(values: Any) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise BadRequest("embedding_input must be a non-empty list of numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise BadRequest("embedding_input must hold numbers only")
    if not all(math.isfinite(v) for v in values):
        raise BadRequest("embedding_input holds a non-finite number")
    return tuple(float(v) for v in values)


def parse_knn_request(data: Any, indices: list[str], limits: Limits) -> KnnRequest:
    """A ``/knn-service`` body as a :class:`KnnRequest`; :class:`BadRequest` names what is wrong.

    Defaults are clip back's where it has one (``num_result_ids`` = ``num_images``, no dedup, the
    first index) and ClipClient's otherwise (``modality`` ``image``, ``num_images`` 40).
    """
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    name = data.get("indice_name") or indices[0]
    if name not in indices:
        raise BadRequest(f"unknown indice_name {name!r}; this service has {', '.join(indices)}", status=404)
    modality = data.get("modality") or "image"
    if modality not in MODALITIES:
        raise BadRequest(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    num_images = _count(data, "num_images", 40, limits)
    common = {
        "indice_name": name,
        "modality": modality,
        "num_images": num_images,
        "num_result_ids": _count(data, "num_result_ids", num_images, limits),
        "deduplicate": _flag(data, "deduplicate", False),
    }
    text, image, image_url, embedding = (
        data.get(k) for k in ("text", "image", "image_url", "embedding_input")
    )
    if text not in (None, ""):
        if not isinstance(text, str):
            raise BadRequest("text must be a string")
        return KnnRequest(**common, text=text)
    if image is not None:
        return KnnRequest(**common, image=_image_bytes(image, limits))
    if image_url is not None:
        if not isinstance(image_url, str) or not image_url.startswith(("http://", "https://")):
            raise BadRequest("image_url must be an http(s) URL")
        return KnnRequest(**common, image_url=image_url)
    if embedding is not None:
        return KnnRequest(**common, embedding=_embedding(embedding))
    raise BadRequest("give one of text, image, image_url or embedding_input")


def parse_metadata_request(data: Any, indices: list[str], limits: Limits) -> tuple[str, list[int]]:
    """``(indice_name, ids)`` of a ``/metadata`` body."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    name = data.get("indice_name") or indices[0]
    if name not in indices:
        raise BadRequest(f"unknown indice_name {name!r}; this service has {', '.join(indices)}", status=404)
    ids = data.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BadRequest("ids must be a list of integers")
    if len(ids) > limits.max_results:
        raise BadRequest(f"at most {limits.max_results} ids per request, got {len(ids)}")
    return name, ids
