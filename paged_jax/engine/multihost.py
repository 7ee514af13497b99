"""Serving across hosts: process 0 runs the HTTP server and its engine loop, the other
processes follow it.

Every process runs the whole engine on the same requests and so takes the same steps
(model/sharding.py says why no step is broadcast). Offline, every process has the requests (SPMD).
A server's requests reach process 0 alone, so process 0 broadcasts what its clients changed
(requests added and aborted) before each step, with `multihost_utils.broadcast_one_to_all`;
the followers apply the same changes and run the same step, whose collectives join them to
process 0's. An idle leader sends an empty message now and then, so followers never wait in a
collective for long. A process that dies ends the others: its peers' next collective fails,
and jax.distributed's coordination service terminates them after `heartbeat_timeout_seconds`
at the latest.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from paged_jax.beam_search import BeamSearchParams
from paged_jax.core.kv_snapshot import KVSnapshot
from paged_jax.engine.client import EngineClient, EngineLoad, PromptType, TokenListener
from paged_jax.outputs import RequestOutput
from paged_jax.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
IDLE_SECONDS = 5.0  # an idle leader's message interval


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               heartbeat_timeout_seconds: int = 30) -> None:
    """jax.distributed.initialize, with CPU collectives over gloo (CPU hosts need them; they
    change nothing on accelerators). A peer silent for heartbeat_timeout_seconds is dead."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)


class Leader:
    """Process 0's engine: an `EngineClient` that runs the engine it wraps and, before each
    step, broadcasts the request changes since the last one to the followers."""

    def __init__(self, engine: EngineClient, idle_seconds: float = IDLE_SECONDS):
        self.engine = engine
        self.args, self.tokenizer, self.vocab_size = engine.args, engine.tokenizer, engine.vocab_size
        self.max_model_len, self.max_num_batched_tokens = engine.max_model_len, engine.max_num_batched_tokens
        self._changes: list[tuple] = []  # ("add", args...) / ("abort", request_id) since the last message
        self._lock = threading.Lock()  # one message at a time, from the engine loop or the idle beat
        self._sent = time.monotonic()
        self._closed = False
        threading.Thread(target=self._beat, args=(idle_seconds,), name="paged-jax-leader", daemon=True).start()

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams | None = None,
                    arrival_time: float | None = None) -> None:
        self.engine.add_request(request_id, prompt, params, arrival_time)  # a refused request is not sent
        with self._lock:
            self._changes.append(("add", request_id, prompt, params, arrival_time))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        output = self.engine.abort_request(request_id)
        with self._lock:
            self._changes.append(("abort", request_id))
        return output

    def step(self, on_tokens: TokenListener | None = None) -> list[RequestOutput]:
        """A step on every process. A decode loop streams here but always runs to its end:
        the followers step without a listener, and every process must run the same steps."""
        with self._lock:
            self._send([("step",)])
            return self.engine.step(on_tokens and (lambda outputs: on_tokens(outputs) or True))

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def load(self) -> EngineLoad:
        return self.engine.load()

    def stats(self) -> dict:
        return self.engine.stats()

    def kv_snapshot(self) -> KVSnapshot:
        return self.engine.kv_snapshot()

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        return self.engine.wait_for_compiles(timeout)

    def close(self) -> None:
        """Tell the followers to stop (they return from `follow`)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                logger.info("telling the followers to stop")
                self._send([("stop",)])

    def _send(self, last: list[tuple]) -> None:
        changes, self._changes = self._changes, []
        _broadcast(pickle.dumps(changes + last))
        self._sent = time.monotonic()

    def _beat(self, idle_seconds: float) -> None:
        while True:
            time.sleep(idle_seconds / 2)
            with self._lock:
                if self._closed:
                    return
                if time.monotonic() - self._sent >= idle_seconds:
                    try:
                        self._send([])
                    except Exception:  # noqa: BLE001 - a peer is gone; the engine loop will say so
                        logger.exception("the idle message to the followers failed")
                        return


def follow(engine: EngineClient) -> None:
    """A follower's life: apply process 0's changes and run its steps until it stops.
    RuntimeError when process 0 goes away without saying so (killed, or stopped by a signal)."""
    while True:
        try:
            message = _broadcast(None)
        except (jax.errors.JaxRuntimeError, ValueError) as error:  # the collective failed
            raise RuntimeError(f"process {jax.process_index()}: process 0 has stopped or died ({error})") from error
        for change in pickle.loads(message):
            kind = change[0]
            if kind == "add":
                engine.add_request(*change[1:])
            elif kind == "abort":
                engine.abort_request(change[1])
            elif kind == "step":
                engine.step()
            else:
                return


def _broadcast(data: bytes | None) -> bytes:
    """Process 0's bytes, in every process (None: a follower's side). Two collectives: the
    length, then the bytes padded to a power of two (few shapes, few compiles)."""
    length = np.asarray([0 if data is None else len(data)], np.int32)
    length = int(np.asarray(multihost_utils.broadcast_one_to_all(length))[0])
    buffer = np.zeros(max(256, 1 << (length - 1).bit_length()), np.uint8)
    if data is not None:
        buffer[:length] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:length].tobytes()
