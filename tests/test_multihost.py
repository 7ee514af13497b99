"""Multi-host: two processes on 127.0.0.1 joined by jax.distributed (CPU collectives over
gloo), tensor parallelism with T = 2 spanning them (tests/multihost_checks.py). Both
return the same greedy outputs as one process; when one is killed, the other fails with an
error that says so, in bounded time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving import generate_ids, make_llm

from multihost_checks import PROMPTS

SCRIPT = Path(__file__).parent / "multihost_checks.py"
BOUND = 120  # seconds from the peer's death to the survivor's exit, start-up included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(checkpoint):
    path = checkpoint("llama")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), port, str(path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    start = time.monotonic()
    results = [p.communicate(timeout=300) for p in procs]
    seconds = time.monotonic() - start
    lines = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in results]
    return dict(path=path, procs=procs, lines=lines, stderr=[err[-3000:] for _, err in results], seconds=seconds)


def test_tensor_parallel_across_two_processes_equals_one_process(job):
    assert job["lines"][0] and job["lines"][1], job["stderr"]
    first, second = job["lines"][0][0], job["lines"][1][0]
    assert first["mesh_processes"] == [0, 1]  # T = 2 really spans the processes
    expected = generate_ids(make_llm(job["path"]), PROMPTS)
    assert first["outputs"] == second["outputs"] == expected


def test_a_killed_peer_ends_the_others_with_a_clear_error(job):
    assert job["procs"][1].returncode == -9  # killed
    survivor = job["lines"][0][-1]
    assert "peer process has died or left" in survivor["error"], job["stderr"][0]
    assert job["procs"][0].returncode != 0
    assert survivor["seconds"] < BOUND and job["seconds"] < 300
