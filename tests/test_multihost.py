"""Multi-host: two processes on 127.0.0.1 joined by jax.distributed (CPU collectives over
gloo), tensor parallelism with T = 2 spanning them. Offline (tests/multihost_checks.py) both
return the same greedy outputs as one process, and when one is killed the other fails with an
error that says so, in bounded time. Served (`paged-jax serve --coordinator-address ...`),
process 0 answers HTTP with what one process answers, the other follows it and ends when it
stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from multihost_checks import PROMPTS
from server_process import free_port
from serving import generate_ids, make_llm

from paged_jax.engine import multihost
from paged_jax.server.serve import DEFAULT_MODEL

SCRIPT = Path(__file__).parent / "multihost_checks.py"
BOUND = 120  # seconds from the peer's death to the survivor's exit, start-up included


@pytest.fixture(scope="module")
def job(checkpoint):
    path = checkpoint("llama")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    port = str(free_port())
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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`paged-jax serve` as two processes with T = 2 over them; one completion; then process 0
    is stopped (SIGTERM) and the follower's exit is timed."""
    from server_process import REPO, running_server

    logs = tmp_path_factory.mktemp("multihost_serve")
    flags = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--tensor-parallel-size",
             "2", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--num-scheduler-steps", "1"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with open(logs / "follower.log", "wb") as log:
        follower = subprocess.Popen([sys.executable, "-m", "paged_jax.server.serve", *flags, "--process-id", "1"],
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with running_server([*flags, "--process-id", "0"], logs / "leader.log", env=env) as url:
            body = {"model": "stdlib-llama", "prompt": "def main(", "max_tokens": 16, "temperature": 0}
            text = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
            time.sleep(multihost.IDLE_SECONDS * 2)  # idle: the follower waits through the leader's idle messages
            later = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        stopped = time.monotonic()
        follower.wait(BOUND)
        return dict(text=text, later=later, follower_seconds=time.monotonic() - stopped,
                    follower_log=(logs / "follower.log").read_text(errors="replace"))
    finally:
        if follower.poll() is None:
            follower.kill()


def test_serving_across_two_processes_equals_one_process(served):
    from paged_jax import LLM, SamplingParams

    llm = LLM(str(DEFAULT_MODEL), max_num_seqs=4, max_num_batched_tokens=32, warm_up=False)
    expected = llm.generate(["def main("], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert served["text"] == served["later"] == expected[0].outputs[0].text


def test_a_follower_ends_when_process_0_stops(served):
    log = served["follower_log"]
    assert served["follower_seconds"] < BOUND
    assert "process 0 has stopped or died" in log or "another task died" in log, log[-2000:]
