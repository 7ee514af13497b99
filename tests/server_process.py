"""A real `python -m paged_jax.server.serve` subprocess on 127.0.0.1 for the server's tests: a free
port, a bounded wait for /health, the log shown if it fails, and a stop that always ends it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 600  # loading and compiling on a busy 2-core machine; normally well under a minute


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start the server with args (host and port are added), wait until /health answers, yield
    its base URL; stop it afterwards, killing it if it does not stop within 20 s."""
    port = free_port()
    command = [sys.executable, "-m", "paged_jax.server.serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    environment = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {START_TIMEOUT} s:\n{_tail(log_path)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def scrape(url: str) -> dict[str, float]:
    """/metrics parsed by prometheus_client's own parser: sample name (with labels other than
    model_name in braces) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
            name = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            samples[name] = sample.value
    return samples


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll predicate until it is true or timeout seconds pass (a bounded loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
