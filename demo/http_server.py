"""A local HTTP server for a folder of files, so downloads can be exercised without the internet.

The demo and the tests serve images on 127.0.0.1 and point img2dataset at them. Besides plain
files the server can misbehave the way real image hosts do: answer some paths only after a delay
(to trigger client timeouts) and answer others with a canned status and body (an HTML error page
sent with status 200 where an image was expected). It counts requests per path, so a test can
prove that a resumed download fetched nothing.

    with LocalHTTPServer("images", slow_paths={"slow.jpg"}, slow_seconds=5) as server:
        server.url("a.jpg")          # http://127.0.0.1:PORT/a.jpg
        server.request_count()       # requests answered so far
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def _normalise(path: str) -> str:
    """URL path or configured name -> the key used for slow/canned lookups and request counts."""
    return unquote(urlsplit(path).path).lstrip("/")


class _Server(ThreadingHTTPServer):
    """The stdlib threaded server plus the per-server behaviour the handler consults."""

    daemon_threads = True

    def __init__(
        self,
        root: Path,
        slow_paths: frozenset[str],
        slow_seconds: float,
        canned: dict[str, tuple[int, bytes]],
        record: Callable[[str], None],
    ):
        self.root = root
        self.slow_paths = slow_paths
        self.slow_seconds = slow_seconds
        self.canned = canned
        self.record = record
        self.stopping = threading.Event()
        super().__init__((HOST, 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        _Handler(request, client_address, self, directory=str(self.root))

    def handle_error(self, request: object, client_address: object) -> None:
        # Called from socketserver's except block. A client that gave up (timeout) makes the late
        # answer fail with a broken pipe, which is expected; nothing is printed to stderr.
        log.debug("request from %s ended with an error", client_address, exc_info=True)


class _Handler(SimpleHTTPRequestHandler):
    server: _Server
    timeout = 30  # a client that connects and never sends a request cannot hold shutdown forever

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _answer_specially(self) -> bool:
        """Delay or replace the answer for configured paths; True when the request is answered."""
        path = _normalise(self.path)
        self.server.record(path)
        if path in self.server.slow_paths and self.server.stopping.wait(self.server.slow_seconds):
            self.close_connection = True  # shutting down: drop the request unanswered
            return True
        if path not in self.server.canned:
            return False
        status, body = self.server.canned[path]
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return True

    def do_GET(self) -> None:
        if not self._answer_specially():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._answer_specially():
            super().do_HEAD()


class LocalHTTPServer:
    """Serve ``root`` on 127.0.0.1 at a free port while the ``with`` block runs.

    Args:
        root: folder whose files are served (sub-folders too).
        slow_paths: paths (relative to ``root``) answered only after ``slow_seconds``; a client
            with a shorter timeout sees a timeout. Closing the server wakes them at once.
        slow_seconds: the delay of ``slow_paths``.
        canned: path -> (status, body) answered as ``text/html`` instead of any file; the path
            need not exist under ``root``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        slow_paths: Iterable[str] = (),
        slow_seconds: float = 5.0,
        canned: Mapping[str, tuple[int, bytes]] | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"cannot serve {self.root}: not a folder")
        self._slow_paths = frozenset(_normalise(p) for p in slow_paths)
        self._slow_seconds = slow_seconds
        self._canned = {
            _normalise(p): (int(status), bytes(body)) for p, (status, body) in (canned or {}).items()
        }
        self._requests: Counter[str] = Counter()
        self._requests_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash); only while the server runs."""
        if self._server is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        return f"http://{HOST}:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` (relative to ``root``), percent-encoded."""
        return f"{self.base_url}/{quote(path.lstrip('/'))}"

    def request_count(self, path: str | None = None) -> int:
        """Requests received so far (also after the server stopped), for one path or in all."""
        with self._requests_lock:
            return sum(self._requests.values()) if path is None else self._requests[_normalise(path)]

    def _record(self, path: str) -> None:
        with self._requests_lock:
            self._requests[path] += 1

    def __enter__(self) -> Self:
        self._server = _Server(self.root, self._slow_paths, self._slow_seconds, self._canned, self._record)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="local-http", daemon=True
        )
        self._thread.start()
        log.debug("serving %s at %s", self.root, self.base_url)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.stopping.set()
        server.shutdown()
        server.server_close()  # joins the request threads; slow ones were woken above
        thread.join()
        self._server = self._thread = None


@contextmanager
def serve_directory(
    root: str | Path,
    *,
    slow_paths: Iterable[str] = (),
    slow_seconds: float = 5.0,
    canned: Mapping[str, tuple[int, bytes]] | None = None,
) -> Iterator[str]:
    """Serve ``root`` for the ``with`` block and yield its base URL (see :class:`LocalHTTPServer`)."""
    with LocalHTTPServer(root, slow_paths=slow_paths, slow_seconds=slow_seconds, canned=canned) as server:
        yield server.base_url
