"""The demo's fleet waits for a slow /v1/status: on a loaded machine (the agents training on every core) the
aggregator's answer took more than 5 s, and `flctl demo` died with a TimeoutError traceback mid-run."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flctl.fleet import Fleet

SLOW_SECONDS = 6.0


class SlowStatus(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(SLOW_SECONDS)
        body = json.dumps({"model": {"version": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_status_waits_for_an_aggregator_that_answers_slowly(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowStatus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        fleet = Fleet(root=tmp_path, port=server.server_address[1])
        assert fleet.status() == {"model": {"version": 3}}
    finally:
        server.shutdown()
        server.server_close()
