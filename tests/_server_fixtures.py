"""A real `kosmos2 serve` process on a free 127.0.0.1 port, for the server tests."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # the HTTP client the openai package brings (httpx2 here; httpx elsewhere)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "examples" / "shapes.png"
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kosmos2 serve ARGS` in its own process; `url` once /health answers."""

    def __init__(self, *args: str, startup_s: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-c", "import sys; from kosmos2.cli import main; sys.exit(main())"]
        command += ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log = tempfile.TemporaryFile()  # the server's stderr (a pipe could fill and block it)
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kosmos2 serve exited with {self.process.returncode}: {self.stderr()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kosmos2 serve did not answer /health within {startup_s} s")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None and httpx.get(self.url + "/health", timeout=5).status_code == 200

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self.log.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{b64(data)}"


def sse_events(lines) -> list[tuple[str, str]]:
    """(event, data) pairs of a server-sent-event stream given as lines."""
    events, event, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


def metric(text: str, name: str) -> float:
    """The value of one sample line of the Prometheus text format (name with its labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)
