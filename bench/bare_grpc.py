"""The floor of flkit's gRPC transport: a bare grpcio stream of a model's bytes between two processes.

A tiny grpcio server (generic handlers, raw ``bytes`` messages: no protobuf, no flkit code)
runs in a child process; the client in the calling process streams ``n`` bytes to it in
2 MiB chunks and gets a tiny reply (``upload``, a stream-unary call), then asks it for ``n``
bytes, which it streams back in 2 MiB chunks (``download``, a unary-stream call). Both ends
cut their chunks from one model-sized buffer with ``bytes(memoryview[a:b])``, as flkit's
``iter_chunks`` does; the receiving end only counts the bytes. So one call is the least that
moving one model over gRPC between two processes costs on this machine, and a round of flkit's
gRPC transport with S sites costs at least S downloads + S uploads.

Used by bench/transports.py; also runnable by itself:

    .venv/bin/python bench/bare_grpc.py --bytes 100000000 --repeats 5
    .venv/bin/python bench/bare_grpc.py --serve          # the server (prints its port, ends on EOF of stdin)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

CHUNK_BYTES = 2 * 1024 * 1024
SERVICE = "flkitbench.Bare"
UPLOAD = f"/{SERVICE}/Upload"
DOWNLOAD = f"/{SERVICE}/Download"


def channel_options() -> list[tuple[str, int]]:
    """flkit's own channel/server options, with message limits of at least a few chunks."""
    try:
        from flkit.wire.grpc_options import OPTIONS
    except Exception:  # the core may be mid-rewrite: fall back to plain limits
        OPTIONS = []
    options = [(k, v) for k, v in OPTIONS if k not in ("grpc.max_send_message_length",
                                                       "grpc.max_receive_message_length")]
    limits = dict(OPTIONS)
    cap = max(4 * CHUNK_BYTES + 64 * 1024, int(limits.get("grpc.max_send_message_length", 0)),
              int(limits.get("grpc.max_receive_message_length", 0)))
    return options + [("grpc.max_send_message_length", cap), ("grpc.max_receive_message_length", cap)]


class _Blob:
    """One buffer per size, kept between calls (its allocation is not part of a transfer)."""

    def __init__(self) -> None:
        self._buf = b""

    def chunks(self, n: int) -> Iterator[bytes]:
        if len(self._buf) < n:
            self._buf = b""
            self._buf = bytes(bytearray(n))  # zeros: gRPC does not compress by default
        view = memoryview(self._buf)
        for start in range(0, n, CHUNK_BYTES):
            yield bytes(view[start : min(n, start + CHUNK_BYTES)])


def serve() -> int:
    """Run the server on 127.0.0.1 (free port, printed on stdout) until stdin closes."""
    blob = _Blob()

    def upload(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        for chunk in request_iterator:
            total += len(chunk)
        return str(total).encode()

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from blob.chunks(int(request))

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Upload": grpc.stream_unary_rpc_method_handler(upload),  # no (de)serializers: raw bytes
        "Download": grpc.unary_stream_rpc_method_handler(download),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=channel_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # the parent closes our stdin to end us
    server.stop(0)
    return 0


class BareClient:
    """The client end; ``with BareClient() as c: c.upload(n)`` starts and ends the server process."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._channel: grpc.Channel | None = None
        self._blob = _Blob()

    def __enter__(self) -> BareClient:
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline() if self._proc.stdout else ""
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"bare grpc server did not start (got {line!r})")
        self._channel = grpc.insecure_channel(f"127.0.0.1:{int(line)}", options=channel_options())
        grpc.channel_ready_future(self._channel).result(timeout=30)
        self._upload = self._channel.stream_unary(UPLOAD)
        self._download = self._channel.unary_stream(DOWNLOAD)
        self.upload(1024)  # first calls pay for connection set-up; not measured
        self.download(1024)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._proc is not None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def upload(self, n: int) -> float:
        """Seconds to stream ``n`` bytes to the server and get its tiny reply."""
        t0 = time.perf_counter()
        reply = self._upload(self._blob.chunks(n), timeout=600)
        dt = time.perf_counter() - t0
        if int(reply) != n:
            raise RuntimeError(f"server got {int(reply)} bytes, sent {n}")
        return dt

    def download(self, n: int) -> float:
        """Seconds to ask for ``n`` bytes and receive all of them."""
        t0 = time.perf_counter()
        got = sum(len(chunk) for chunk in self._download(str(n).encode(), timeout=600))
        dt = time.perf_counter() - t0
        if got != n:
            raise RuntimeError(f"got {got} bytes, asked for {n}")
        return dt


def measure(sizes: list[int], repeats: int = 5) -> dict[int, dict[str, float]]:
    """For each size: median seconds of one upload and one download (``repeats`` each), one server."""
    out: dict[int, dict[str, float]] = {}
    with BareClient() as client:
        for n in sizes:
            client.upload(n)  # warm: the first model-sized call also sizes both ends' buffers
            ups = [client.upload(n) for _ in range(repeats)]
            client.download(n)
            downs = [client.download(n) for _ in range(repeats)]
            out[n] = {"bytes": n, "upload_s": statistics.median(ups), "download_s": statistics.median(downs),
                      "upload_all_s": ups, "download_all_s": downs}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true", help="run the server (used by the client)")
    ap.add_argument("--bytes", type=int, default=100_000_000, help="bytes per transfer (default 100 MB)")
    ap.add_argument("--repeats", type=int, default=5, help="transfers each way (median; default 5)")
    args = ap.parse_args(argv)
    if args.serve:
        return serve()
    print(json.dumps(measure([args.bytes], args.repeats)[args.bytes]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
