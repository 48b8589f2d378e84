"""The kNN service: clip-retrieval's own ClipClient, configured as AMG-sd configures it, against
``jobs/serve_knn.py`` (real Ray Serve on 127.0.0.1) over the demo bundle; answers are checked against
the bundle read directly, and every bad-request class gets its 4xx while the replica keeps serving.

The request parser is also tested in-process (no Ray), one case per refusal.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import REPO, free_port, run_script
from PIL import Image

from pipeline.bundle.reader import open_bundle
from pipeline.dedup.text_normalize import normalize_captions
from pipeline.io.embeddings import load_metadata
from pipeline.io.images import ShardImages
from pipeline.serve.app import wait_until_routed
from pipeline.serve.protocol import BadRequest, Limits, parse_knn_request, parse_metadata_request

INDEX = "laion5B-L-14"  # the name AMG-sd asks for; served here under it
MAX_IMAGE_BYTES = 300_000
MAX_IMAGE_PIXELS = 250_000


def clip_client_module() -> ModuleType:
    """clip-retrieval's ``clip_client.py``, loaded by file path: the package is installed without its
    dependencies (it pins numpy<2 and pyarrow<16), and this one module needs only ``requests``."""
    spec = importlib.util.find_spec("clip_retrieval")
    assert spec is not None and spec.submodule_search_locations, (
        "make venv installs clip-retrieval (--no-deps)"
    )
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# --- the request parser, in-process -----------------------------------------------------------


def test_requests_are_parsed_with_clip_backs_defaults():
    knn = parse_knn_request({"text": "a cat", "num_images": 7}, [INDEX, "b"], Limits())
    assert (knn.indice_name, knn.modality, knn.num_result_ids, knn.deduplicate) == (INDEX, "image", 7, False)
    both = parse_knn_request(
        {"text": "", "embedding_input": [1, 0.5], "indice_name": "b"}, [INDEX, "b"], Limits()
    )
    assert both.text is None and both.embedding == (1.0, 0.5) and both.num_images == 40
    # ClipClient always sends these; the service accepts them and leaves them out of the search.
    ignored = {"use_mclip": True, "aesthetic_score": 9, "aesthetic_weight": 0.5, "use_safety_model": True}
    assert parse_knn_request({"text": "x", **ignored}, [INDEX], Limits()).text == "x"


@pytest.mark.parametrize(
    "body, status, message",
    [
        ([1, 2], 400, "JSON object"),
        ({"text": "x", "indice_name": "laion400m"}, 404, "unknown indice_name 'laion400m'"),
        ({"text": "x", "num_images": 0}, 400, "num_images must be between 1 and 100"),
        ({"text": "x", "num_images": 101}, 400, "num_images must be between 1 and 100"),
        ({"text": "x", "num_images": "10"}, 400, "num_images must be an integer"),
        ({"text": "x", "num_result_ids": 1000}, 400, "num_result_ids must be between"),
        ({"text": "x", "modality": "audio"}, 400, "modality must be one of image, text"),
        ({"image": "not base64!"}, 400, "not valid base64"),
        ({"image": "A" * 2000}, 413, "over 1000 bytes"),
        ({"image_url": "file:///etc/passwd"}, 400, "http(s) URL"),
        ({"embedding_input": [1, float("nan")]}, 400, "non-finite"),
        ({"embedding_input": "0.1,0.2"}, 400, "list of numbers"),
        ({"deduplicate": "yes", "text": "x"}, 400, "deduplicate must be true or false"),
        ({"num_images": 3}, 400, "give one of text, image, image_url or embedding_input"),
    ],
)
def test_each_bad_request_gets_a_clear_status(body: Any, status: int, message: str):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
        parse_knn_request(body, [INDEX], Limits(max_results=100, max_image_bytes=1000))
    assert refused.value.status == status


def test_metadata_requests_name_ids():
    assert parse_metadata_request({"ids": [3, 1]}, [INDEX], Limits()) == (INDEX, [3, 1])
    for body in ({"ids": "3"}, {"ids": [1.5]}, {"ids": [True]}):
        with pytest.raises(BadRequest, match="ids must be a list of integers"):
            parse_metadata_request(body, [INDEX], Limits())


# --- the service, over the demo bundle -----------------------------------------------------------


@pytest.fixture(scope="module")
def service(demo_run, tmp_path_factory: pytest.TempPathFactory):
    """``jobs/serve_knn.py`` over the demo bundle, as AMG-sd's index name; stopped with SIGTERM after."""
    bundle = demo_run["out"] / "bundle"
    port = free_port()
    log = tmp_path_factory.mktemp("knn") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        *(sys.executable, "jobs/serve_knn.py", "--bundle", str(bundle), "--indice-name", INDEX),
        *("--port", str(port), "--cache-dir", str(log.parent / "cache")),
        *("--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_IMAGE_PIXELS)),
        *("--ray-num-cpus", "2", "--ray-object-store-mb", "256"),
    ]
    with log.open("w") as sink:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=sink, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_routed(base, 240, running=lambda: process.poll() is None)
        yield {"base": base, "bundle": open_bundle(bundle, verify=False), "demo": demo_run["out"]}
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["indices"] == {INDEX: str(bundle)}


def _client(service, deduplicate: bool, num_images: int = 1000):
    """A ClipClient exactly as AMG-sd's txt2img.py builds it, with the URL pointed here."""
    clip_client = clip_client_module()
    return clip_client.ClipClient(
        url=f"{service['base']}/knn-service",
        indice_name=INDEX,
        aesthetic_score=9,
        aesthetic_weight=0.5,
        modality=clip_client.Modality.IMAGE,
        num_images=num_images,
        deduplicate=deduplicate,
    )


def _post(url: str, body: bytes) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_amg_sd_client_gets_the_bundles_neighbours_captions_and_images(service):
    bundle = service["bundle"]
    rng = np.random.default_rng(0)
    query = bundle.embeddings(np.array([5]))[0] + rng.normal(0, 0.05, bundle.dim).astype(np.float32)
    answers = _client(service, deduplicate=False).query(embedding_input=query.tolist())

    k = min(1000, len(bundle))
    scores, ids = bundle.search_embeddings(query, k)
    assert [a["id"] for a in answers] == ids[0][ids[0] >= 0].tolist()
    assert np.allclose([a["similarity"] for a in answers], scores[0][: len(answers)], atol=1e-5)
    assert [a["caption"] for a in answers] == [bundle.row(a["id"])["caption"] for a in answers]

    # Every returned url serves the sample's own image bytes, as stored in its shard.
    meta = load_metadata(bundle.path / "embeddings", ["shard", "sha256"])
    images = ShardImages(service["demo"] / "shards")
    for answer in answers[:5]:
        shard, key = meta.column("shard")[answer["id"]].as_py(), bundle.row(answer["id"])["key"]
        with urllib.request.urlopen(answer["url"], timeout=30) as response:
            served = response.read()
            assert response.headers["content-type"] == "image/jpeg"
        assert served == images.read([(shard, key)])[(shard, key)]
        assert hashlib.sha256(served).hexdigest() == meta.column("sha256")[answer["id"]].as_py()


@pytest.mark.slow
def test_deduplicate_keeps_the_best_row_of_each_duplicate_group(service):
    bundle = service["bundle"]
    group = {r: bundle.row(r)["image_group_id"] for r in range(len(bundle))}
    query = bundle.embeddings(np.array([0]))[0]  # a verbatim-duplicated demo picture: its group is large
    every = _client(service, deduplicate=False).query(embedding_input=query.tolist())
    unique = _client(service, deduplicate=True).query(embedding_input=query.tolist())
    assert len(unique) < len(every)
    first_of_group: dict[int, int] = {}
    for answer in every:
        first_of_group.setdefault(group[answer["id"]], answer["id"])
    assert [a["id"] for a in unique] == list(first_of_group.values())  # rank order, one per group


@pytest.mark.slow
def test_text_image_and_image_url_queries_embed_with_the_bundles_model(service):
    """A training image sent back (as a file, base64, and as its service URL) finds itself or an exact
    copy at similarity ~1; a caption finds rows (the demo model is random, so no ranking claim)."""
    bundle = service["bundle"]
    client = _client(service, deduplicate=True, num_images=5)
    picture = client.query(embedding_input=bundle.embeddings(np.array([7]))[0].tolist())[0]
    with urllib.request.urlopen(picture["url"], timeout=30) as response:
        data = response.read()
    image_file = service["demo"].parent / "query.jpg"
    image_file.write_bytes(data)
    for answers in (client.query(image=str(image_file)), client.query(image=picture["url"])):
        assert answers[0]["similarity"] > 0.99
        assert bundle.row(answers[0]["id"])["image_group_id"] == bundle.row(picture["id"])["image_group_id"]
    by_text = client.query(text=bundle.row(7)["caption"])
    assert by_text and all(set(a) == {"url", "caption", "id", "similarity"} for a in by_text)
    status, by_caption = _post(
        f"{service['base']}/knn-service",
        json.dumps({"text": bundle.row(7)["caption"], "modality": "text", "num_images": 3}).encode(),
    )
    # The demo has the same caption in other cases; the tokenizer lowercases, so they tie at the top.
    top = bundle.row(by_caption[0]["id"])["caption"]
    assert status == 200 and top.casefold() == bundle.row(7)["caption"].casefold()


@pytest.mark.slow
def test_metadata_and_indices_list(service):
    with urllib.request.urlopen(f"{service['base']}/indices-list", timeout=30) as response:
        assert json.loads(response.read()) == [INDEX]
    status, metas = _post(
        f"{service['base']}/metadata", json.dumps({"ids": [3, 0], "indice_name": INDEX}).encode()
    )
    assert status == 200 and [m["id"] for m in metas] == [3, 0]
    assert metas[0]["metadata"]["caption"] == service["bundle"].row(3)["caption"]
    assert metas[0]["metadata"]["key"] == service["bundle"].row(3)["key"]


@pytest.mark.slow
def test_y_n_from_the_services_answers_equals_the_bundles_lookup(service):
    """AMG-sd's rule on the service's deduplicate=False answers (the most frequent caption among the
    k neighbours, kept when it occurs at least min_count times, nearest first on ties; captions
    compared in the bundle's normalised form) equals the bundle's y_N lookup by embedding
    (Bundle.duplicate_caption_near) for every row's own embedding."""
    bundle = service["bundle"]
    client = _client(service, deduplicate=False, num_images=bundle.duplicate_caption_k)
    for row_id in range(len(bundle)):
        answers = client.query(embedding_input=bundle.embeddings(np.array([row_id]))[0].tolist())
        captions = [a["caption"] for a in answers]
        normal = normalize_captions(captions).to_pylist()
        counts = Counter(n for n in normal if n)
        y_n = None
        if counts:
            top, count = counts.most_common(1)[0]
            y_n = top if count >= bundle.min_count else None
        found = bundle.duplicate_caption_near(bundle.embeddings(np.array([row_id]))[0]).caption
        assert y_n == (None if found is None else normalize_captions([found])[0].as_py()), row_id


@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_replica_keeps_serving(service):
    url = f"{service['base']}/knn-service"
    big = Image.new("RGB", (600, 600), (200, 30, 30))  # 360,000 pixels, over the service's 250,000
    buf = io.BytesIO()
    big.save(buf, "PNG")
    cases = [
        (b"{not json", 400, "not JSON"),
        (json.dumps({"text": "x", "indice_name": "laion400m"}).encode(), 404, "unknown indice_name"),
        (json.dumps({"text": "x", "num_images": 10**6}).encode(), 400, "num_images must be between"),
        (json.dumps({"image": "%%%"}).encode(), 400, "not valid base64"),
        (json.dumps({"image": base64.b64encode(b"GIF89a broken").decode()}).encode(), 400, "cannot be used"),
        (
            json.dumps({"image": base64.b64encode(os.urandom(MAX_IMAGE_BYTES + 10)).decode()}).encode(),
            413,
            "over",
        ),
        (json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode(), 413, "pixels"),
        (json.dumps({"embedding_input": [0.5, 0.5]}).encode(), 400, "this index needs"),
    ]
    for body, status, message in cases:
        got, answer = _post(url, body)
        assert (got, message in answer["error"]) == (status, True), (status, answer)
    status, _ = _post(f"{service['base']}/metadata", json.dumps({"ids": [10**9]}).encode())
    assert status == 400
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{service['base']}/image/no-such-key", timeout=30)
    assert missing.value.code == 404
    good = _client(service, deduplicate=False, num_images=3).query(
        embedding_input=[0.1] * service["bundle"].dim
    )
    assert len(good) == 3


@pytest.mark.slow
def test_a_folder_that_is_not_a_bundle_is_refused_before_ray_starts(tmp_path: Path):
    done = run_script("jobs/serve_knn.py", "--bundle", str(tmp_path), timeout=120)
    assert done.returncode == 2 and "is not a bundle: no manifest.json" in done.stderr
    assert "started a local Ray" not in done.stderr
