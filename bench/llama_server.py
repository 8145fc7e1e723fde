"""llama.cpp's own HTTP server as the cpu-peer scenario's batched peer: parallel slots and
continuous batching, what a CPU user serving many requests with llama.cpp would run instead.

Why it is measured beside the fleet: the 8-in-flight target compares the fleet with llama.cpp's one
stream, and whether any server over llama.cpp can double its one stream at 8 in flight depends on
the CPU (a batched step of 8 rows cost 3-6x one row in the CPUs measured, by weight type and CPU).
llama.cpp's server on the same file, same prompts and same clients says what llama.cpp itself gets
there. Its requests are driven as the fleets' are (bench/cpu_peer.py, ``closed_loop``).

The binary is built by ``make llama-server`` from the llama.cpp that the pinned llama-cpp-python
vendors, with the backend's CPU flags (bench only: the fleet never runs it). Without it the scenario
records why and measures the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx

MISSING = "no llama-server binary: `make llama-server` builds it (or set AUTOGLM_LLAMA_SERVER to one)"


def binary() -> str | None:
    """``$AUTOGLM_LLAMA_SERVER``, the venv's (where ``make llama-server`` puts it), or one on PATH."""
    named = os.environ.get("AUTOGLM_LLAMA_SERVER")
    if named:
        return named if Path(named).is_file() else None
    beside = Path(sys.executable).with_name("llama-server")
    return str(beside) if beside.is_file() else shutil.which("llama-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``llama-server`` on ``gguf``: ``slots`` parallel slots in one unified KV cache of ``cells``
    (as the llama_cpp backend's generation context), continuous batching, flash attention as the
    backend sets it, all the CPUs' threads."""

    def __init__(self, path: str, gguf: str, threads: int, flash_attn: bool, slots: int, cells: int,
                 max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.resent = 0
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="autoglm-llama-server-", suffix=".log")[1])
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [path, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads), "-tb", str(threads),
                 "-c", str(cells), "-np", str(slots), "--kv-unified", "--cont-batching", "-fa", "on" if flash_attn else "off",
                 "--no-webui", "-ngl", "0"], stdout=out, stderr=subprocess.STDOUT)
        # A connection per request: the server's HTTP library closes a kept-alive connection after a
        # few requests, and a client reusing it at that moment reads a disconnect.
        self.http = httpx.Client(base_url=self.url, timeout=600, limits=httpx.Limits(max_keepalive_connections=0))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.http.close()
                raise RuntimeError(f"llama-server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"llama-server not ready in 120 s: {self.log.read_text()[-2000:]}")

    def one(self, messages: list[dict[str, str]]) -> tuple[int, float]:
        """One streamed chat completion, greedy: (completion tokens, ms to the first text)."""
        started, first, tokens = time.perf_counter(), None, 0
        body = {"messages": messages, "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with self._send(body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c["delta"].get("content") for c in chunk.get("choices") or []):
                    first = (time.perf_counter() - started) * 1000
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return tokens, first if first is not None else (time.perf_counter() - started) * 1000

    @contextlib.contextmanager
    def _send(self, body: dict[str, Any]) -> Iterator[httpx.Response]:
        """The streamed response; a request the server closed before answering (seen once in a
        bench run on a 2-core box, never reproduced alone) is sent again, once, and counted in
        ``resent``: it spent no decoding, and its time still counts from the first try."""
        request = self.http.build_request("POST", "/v1/chat/completions", json=body)
        try:
            response = self.http.send(request, stream=True)
        except httpx.RemoteProtocolError:
            self.resent += 1
            response = self.http.send(request, stream=True)
        try:
            response.raise_for_status()
            yield response
        finally:
            response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
