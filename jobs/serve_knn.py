"""Serve bundles over clip-retrieval's `clip back` HTTP API, so ClipClient users work offline.

    python jobs/serve_knn.py --bundle BUNDLE [--port 1234] [--public-url http://HOST:1234]
    python jobs/serve_knn.py --bundle A,B --indice-name laion5B-L-14,other --max-replicas 4
    ray job submit --working-dir . -- python jobs/serve_knn.py --bundle /shared/bundle --host 0.0.0.0

Routes: POST /knn-service, POST /metadata, GET /indices-list (as clip back), and GET /image/KEY (the
sample's image, read from the bundle's shards; result urls point there). Point a ClipClient at
http://HOST:PORT/knn-service with indice_name set to a served name. Runs on Ray Serve (a local Ray,
or the cluster with --ray-address / RAY_ADDRESS) until stopped with Ctrl-C or SIGTERM, then prints
its summary line.
"""

import logging
import signal
import threading
import time

from _bootstrap import run_job

from pipeline.bundle.layout import BundleError
from pipeline.bundle.reader import bundle_root_hash
from pipeline.core.cli import build_parser, parse_config
from pipeline.core.ray_runtime import ray_session
from pipeline.serve.app import build_app, local_url, serve_options, served_bundles, wait_until_routed


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="serve"), argv)
    bundles = served_bundles(cfg.serve)  # bad options and bundles fail here, before Ray starts
    for path in bundles.values():
        try:
            bundle_root_hash(path, verify=False)
        except BundleError as exc:
            raise ValueError(str(exc)) from exc
    stop = threading.Event()
    started = time.monotonic()
    with ray_session(cfg.ray):
        from ray import serve  # after the session: Serve attaches to this job's Ray

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines are about itself

        serve.start(
            http_options={"host": cfg.serve.host, "port": cfg.serve.port},
            logging_config={"log_level": "WARNING"},
        )
        serve.run(build_app(cfg.serve), name="knn", route_prefix="/")
        wait_until_routed(local_url(cfg.serve))
        url = serve_options(cfg.serve).public_url
        for sig in (signal.SIGINT, signal.SIGTERM):  # after Ray's start, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        logging.getLogger("job").info(
            "serve_knn: %s at %s/knn-service (Ctrl-C to stop)", ", ".join(bundles), url
        )
        stop.wait()
        serve.shutdown()
    return {
        "job": "serve_knn",
        "indices": bundles,
        "url": url,
        "seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    run_job(main)
