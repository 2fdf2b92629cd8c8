"""moto's S3 server, optionally delaying every request by a simulated network round trip.

Against moto on the same machine a request costs server CPU only, while a real
S3 request from a GPU worker waits ~10-50 ms on the network, which is what
concurrency hides. The delay is a sleep in the server's request thread
(werkzeug serves each request on its own thread), so it costs the server no CPU
and concurrent requests wait at the same time, as they would on a network.

Shared by the benchmarks that talk to moto (``bench_transfer.py``,
``bench_ingest.py``)::

    from _moto_rtt import start_server
    process = start_server(port, rtt_ms)   # then poll the endpoint until it answers

Run directly: ``python benchmarks/_moto_rtt.py PORT RTT_MS``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def start_server(port: int, rtt_ms: float = 0.0) -> subprocess.Popen:
    """Start the server on 127.0.0.1:``port`` in its own process (not waiting for it to answer)."""
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(port), str(rtt_ms)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_PORT": str(port)},
    )


def serve(port: int, rtt_ms: float) -> None:
    """Run moto's server app (as ``python -m moto.server`` does), each request delayed by ``rtt_ms``."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    app = DomainDispatcherApplication(create_backend_app)
    delay = rtt_ms / 1000

    def delayed(environ, start_response):
        if delay:
            time.sleep(delay)
        return app(environ, start_response)

    run_simple("127.0.0.1", port, delayed, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]))
