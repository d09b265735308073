"""
P2: stream one large file to a local path or a file:// ObjectStoragePath (the measured child), and ``--serve``: a
static file server that is never the bottleneck (the kernel's ``sendfile``), so the figure against curl is the
client's own cost and not the fake server's (Starlette, one thread-pool hop per 1 MB read).
"""

from __future__ import annotations

import argparse
import http.server
import os
import time

from benchmarks.common import PeakRss, emit


def serve(path: str, port: int) -> None:
    """Answer every GET with the file at ``path`` (as ``/v1/files/<id>/content`` does), until killed."""
    size = os.path.getsize(path)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI's API

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(path, "rb") as content:
                self.connection.sendfile(content)

        def log_message(self, format: str, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file-id", default="file-static")
    parser.add_argument("--dest")
    parser.add_argument("--mode", choices=["local", "objectstorage"], default="local")
    parser.add_argument("--serve", metavar="PATH", help="serve this file on --port instead of downloading")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    from airflow.sdk import ObjectStoragePath

    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    hook = OpenAIBatchHook()
    hook.get_conn()
    target = ObjectStoragePath(f"file://{args.dest}") if args.mode == "objectstorage" else args.dest
    with PeakRss() as peak:
        started = time.perf_counter()
        result = hook.download_file(args.file_id, target, overwrite=True)
        wall = time.perf_counter() - started
    emit({"wall": wall, "bytes": result.bytes, "lines": result.lines, "extra_rss": peak.extra})


if __name__ == "__main__":
    main()
