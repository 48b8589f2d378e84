"""The kNN service on Ray Serve: clip back's HTTP routes in front of :class:`ServedBundle` replicas.

Each replica opens every served bundle once (memory-mapped index, embeddings and row cache) and
answers all routes. Searches that arrive together are batched into one FAISS call per (bundle,
modality) with ``serve.batch``; query embedding, search and metadata run in worker threads so the
replica's event loop keeps accepting requests. Replicas scale between ``min_replicas`` and
``max_replicas`` on the number of requests in flight.

Run it with ``jobs/serve_knn.py`` (starts or joins Ray, then serves until stopped), or with Ray's
own CLI: ``serve run pipeline.serve.app:app_builder bundle=DIR port=1234``.
"""

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.config import ServeConfig
from pipeline.serve.knn import ServedBundle, ServeOptions
from pipeline.serve.protocol import BadRequest, Limits, parse_knn_request, parse_metadata_request

api = FastAPI(title="kNN service over a training-set bundle (clip-retrieval's clip back API)")


@api.exception_handler(BadRequest)
async def _refuse(_: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


def served_bundles(cfg: ServeConfig) -> dict[str, str]:
    """Served name -> bundle folder, from the comma-separated ``bundle`` and ``indice_name`` options."""
    paths = [p.strip() for p in cfg.bundle.split(",") if p.strip()]
    if not paths:
        raise ValueError("--bundle is required")
    names = [n.strip() for n in (cfg.indice_name or "").split(",") if n.strip()] or [
        Path(p).resolve().name for p in paths
    ]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"give one distinct --indice-name per bundle: {names} for {paths}")
    return dict(zip(names, paths, strict=True))


def serve_options(cfg: ServeConfig) -> ServeOptions:
    public = cfg.public_url or f"http://{cfg.host}:{cfg.port}"
    limits = Limits(cfg.max_results, cfg.max_image_bytes, cfg.max_image_pixels)
    return ServeOptions(public.rstrip("/"), limits, cfg.include_images)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class KnnService:
    """One replica: every served bundle, behind clip back's routes."""

    def __init__(
        self, bundles: dict[str, str], cache_dir: str, options: ServeOptions, batching: dict[str, Any]
    ):
        cache = Path(cache_dir).expanduser()
        self.served = {name: ServedBundle(name, path, cache, options) for name, path in bundles.items()}
        self.names = list(bundles)
        self.limits = options.limits
        self.search_batch.set_max_batch_size(batching["max_batch_size"])
        self.search_batch.set_batch_wait_timeout_s(batching["batch_wait_s"])

    @staticmethod
    def _json(value: Any) -> Response:
        """A JSON response, serialised once: FastAPI's own path re-encodes every field of a 1,000-row
        answer through ``jsonable_encoder`` first, which costs more than the search. (A method, not a
        module function: Serve ships the ingress class by value, without this module's globals.)"""
        return Response(content=json.dumps(value), media_type="application/json")

    async def _body(self, request: Request) -> Any:
        size = int(request.headers.get("content-length") or 0)
        if size > self.limits.max_image_bytes * 2:
            raise BadRequest(f"request body of {size} bytes is too large", status=413)
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not JSON: {exc}") from exc

    @api.get("/indices-list")
    def indices_list(self) -> list[str]:
        return self.names

    @api.post("/knn-service")
    async def knn_service(self, request: Request) -> Response:
        knn = parse_knn_request(await self._body(request), self.names, self.limits)
        served = self.served[knn.indice_name]
        vector = await asyncio.to_thread(served.query_vector, knn)
        scores, ids = await self.search_batch(knn.indice_name, knn.modality, vector, knn.num_result_ids)
        answer = await asyncio.to_thread(served.answer, knn, scores, ids)
        return self._json(answer)

    @api.post("/metadata")
    async def metadata(self, request: Request) -> Response:
        name, ids = parse_metadata_request(await self._body(request), self.names, self.limits)
        return self._json(await asyncio.to_thread(self.served[name].metadata, ids))

    @api.get("/image/{key:path}")
    async def image(self, key: str, indice_name: str | None = None) -> Response:
        name = indice_name or self.names[0]
        if name not in self.served:
            raise BadRequest(f"unknown indice_name {name!r}", status=404)
        data, media_type = await asyncio.to_thread(self.served[name].image, key)
        return Response(content=data, media_type=media_type)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def search_batch(
        self, names: list[str], modalities: list[str], vectors: list[np.ndarray], ks: list[int]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Concurrent searches, one FAISS call per (bundle, modality) at the largest k asked."""
        out: list[Any] = [None] * len(vectors)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(zip(names, modalities, strict=True)):
            groups.setdefault(key, []).append(i)
        for (name, modality), members in groups.items():
            k = max(ks[i] for i in members)
            queries = np.stack([vectors[i] for i in members])
            scores, ids = await asyncio.to_thread(self.served[name].search, queries, k, modality)
            for row, i in enumerate(members):
                out[i] = (scores[row, : ks[i]], ids[row, : ks[i]])
        return out


def local_url(cfg: ServeConfig) -> str:
    """The service's base URL on this node (a wildcard ``--host`` is reached at 127.0.0.1)."""
    host = "127.0.0.1" if cfg.host in ("", "0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def wait_until_routed(
    base_url: str, timeout_s: float = 120, running: Callable[[], bool] = lambda: True
) -> None:
    """Return once ``GET BASE/indices-list`` answers 200: Serve's proxy answers 404 for a moment after
    ``serve.run`` returns, until it has the application's routes. ``running`` (a server process
    still alive, say) ends the wait early when it turns false.

    Raises:
        RuntimeError: no 200 within ``timeout_s``, or ``running`` turned false.
    """
    url = f"{base_url}/indices-list"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError as exc:  # refused, or 404 from a proxy without the routes yet
            if time.monotonic() > deadline or not running():
                raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s: {exc}") from exc
            time.sleep(0.5)


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application for ``cfg``: the deployment sized and bound to its bundles."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus},
    }
    if cfg.max_replicas > cfg.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": 4,
        }
    else:
        options["num_replicas"] = cfg.min_replicas
    batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_s": cfg.batch_wait_s}
    return KnnService.options(**options).bind(
        served_bundles(cfg), cfg.cache_dir, serve_options(cfg), batching
    )


def app_builder(args: dict[str, str]) -> Any:
    """``serve run pipeline.serve.app:app_builder bundle=DIR [port=...]``: Ray's CLI, same options."""
    argv: list[str] = []
    for name, value in args.items():
        flag = name.replace("_", "-")
        if str(value).lower() in ("true", "false"):
            argv.append(f"--{flag}" if str(value).lower() == "true" else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return build_app(parse_config(build_parser(__doc__ or "", main="serve", extra=()), argv).serve)
