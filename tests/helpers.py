"""Small pieces several test modules share: a local HTTP server, a call-counting spy."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator


def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 (a free port) until the generator is closed; yields the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Spy:
    """Wraps a one-argument function and counts its calls."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn, self.calls = fn, 0

    def __call__(self, arg: Any) -> Any:
        self.calls += 1
        return self.fn(arg)
