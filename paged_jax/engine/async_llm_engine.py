"""AsyncLLMEngine: one engine (an `EngineClient`: an LLMEngine, the data-parallel front or the
multi-host leader) shared by many asyncio clients (vLLM's online engine).

One thread, the engine loop, owns the engine: it alone calls `add_request`, `step` and
`abort_request`. Coroutines talk to it through a command queue (add, abort) and receive their
outputs through a per-request stream, fed with `loop.call_soon_threadsafe`. Requests that
arrive while a step runs are admitted between steps and join the next one, so clients on
different connections are batched together.

Why a dedicated thread rather than `run_in_executor(None, engine.step)` from a coroutine: the
step loop then never waits for the event loop. With an executor, every step's completion is a
callback on the event loop, and the next step starts only when the loop gets to it; with many
streaming clients the loop is busy encoding and writing SSE chunks, and that time would be
added to every step. The jitted step releases the GIL while XLA runs, so the event loop keeps
serving HTTP while the device works. `python -m experiments.engine_loop` measures both on the
serving benchmark's workload, clients serialising a chunk per output: the thread gives the
lower TTFT and TPOT at the same throughput (experiments/results/engine_loop_cpu.md).

Outputs are cumulative (a RequestOutput carries the whole text and token list so far), so a
stream keeps only the newest one: a slow client never makes the engine queue up outputs, and
it loses nothing by skipping intermediate ones.

An exception inside a step fails the requests that were in the engine (their state after a
failed step cannot be trusted): each is aborted, which frees its blocks, and its client gets
the error. The loop carries on with the requests that arrive next.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from paged_jax.beam_search import BeamSearchParams
from paged_jax.engine.client import EngineClient, EngineLoad, PromptType
from paged_jax.engine.data_parallel import make_engine
from paged_jax.engine_args import EngineArgs
from paged_jax.outputs import RequestOutput
from paged_jax.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: no request can be served."""


class RequestFailedError(RuntimeError):
    """A step that computed this request raised; the request was aborted and its blocks freed."""


class RequestStream:
    """One request's outputs, from the engine thread to the coroutine awaiting them."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.admitted: asyncio.Future = loop.create_future()
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.finished = False  # the last output (or an error) has been delivered

    # -- engine thread side (always through loop.call_soon_threadsafe) -------------------------

    def put(self, output: RequestOutput) -> None:
        self._latest = output
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        if not self.admitted.done():
            self.admitted.set_exception(error)
        self._error = error
        self._ready.set()

    def admit(self) -> None:
        if not self.admitted.done():
            self.admitted.set_result(None)

    # -- coroutine side ------------------------------------------------------------------------

    async def get(self) -> RequestOutput:
        """The newest output not yet returned; raises the request's error."""
        await self._ready.wait()
        output, self._latest = self._latest, None
        if output is None:  # only an error wakes us without an output
            self.finished = True
            raise self._error
        if self._error is None:  # else stay ready: the error comes next
            self._ready.clear()
        if output.finished:
            self.finished = True
        return output

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams | BeamSearchParams
    arrival_time: float
    stream: RequestStream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Commands:
    """What coroutines asked of the engine since the loop last looked."""

    queue: collections.deque = field(default_factory=collections.deque)
    condition: threading.Condition = field(default_factory=threading.Condition)


OutputHook = Callable[[RequestOutput], None]
AbortHook = Callable[[str, str], None]  # (request_id, reason: "abort" | "error")


class AsyncLLMEngine:
    """`async for output in engine.generate(prompt, params, request_id)`; `await engine.abort(id)`.

    `on_output` is called in the engine thread with every output the engine returns and
    `on_finish_early(request_id, reason)` for every request that ends by abort or error:
    metrics are made there, from what the engine records, without another clock.

    With `start_engine_loop=False` no thread is started: the owner drives the engine by calling
    `run_iteration` (experiments/engine_loop.py runs it in an executor to measure that design)."""

    def __init__(self, engine: EngineClient, on_output: OutputHook | None = None,
                 on_finish_early: AbortHook | None = None, start_engine_loop: bool = True):
        self.engine = engine
        self.on_output = on_output
        self.on_finish_early = on_finish_early
        self._commands = _Commands()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._outbox: list = []  # engine thread only: (loop, method, args) to call after the iteration
        self._stopping = False
        self._dead: BaseException | None = None
        self.latest_load: EngineLoad = engine.load()  # the queues and blocks after the latest iteration
        self._thread: threading.Thread | None = None
        if start_engine_loop:
            self._thread = threading.Thread(target=self._run, name="paged-jax-engine", daemon=True)
            self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **hooks) -> AsyncLLMEngine:
        return cls(make_engine(args), **hooks)

    # -- the client's side ---------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: PromptType,
                          params: SamplingParams | BeamSearchParams | None = None,
                          arrival_time: float | None = None) -> RequestStream:
        """Queue a request and wait until the engine has admitted it (between two steps).
        Raises ValueError, from `LLMEngine.add_request`, for a request that can never run."""
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._send(_Add(request_id, prompt, params or SamplingParams(),
                        time.time() if arrival_time is None else arrival_time, stream))
        try:
            await stream.admitted
        except asyncio.CancelledError:
            self.abort_nowait(request_id)  # the client left before admission
            raise
        return stream

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | BeamSearchParams,
                       request_id: str, arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs as tokens arrive (cumulative, like LLMEngine.step's), the finished one last.
        Leaving the loop early (break, cancellation, a closed connection) aborts the request,
        which frees its blocks before the next step."""
        stream = await self.add_request(request_id, prompt, sampling_params, arrival_time)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort_nowait(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends (finish_reason "abort") and its blocks are freed
        before the next step."""
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """`abort` for code that cannot await (a `finally` of a cancelled coroutine)."""
        self._send(_Abort(request_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop after the current step; requests still running fail (without the
        engine thread: `run_iteration` does nothing from now on)."""
        with self._commands.condition:
            self._stopping = True
            self._commands.condition.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        alive = self._thread.is_alive() if self._thread is not None else not self._stopping
        return alive and self._dead is None

    def _send(self, command: _Add | _Abort) -> None:
        with self._commands.condition:
            if self._dead is not None:  # set, and the queue drained, under this same lock
                if isinstance(command, _Add):
                    raise self._dead
                return
            self._commands.queue.append(command)
            self._commands.condition.notify()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self.run_iteration(wait=True):
                pass
        except BaseException as error:  # a bug in the loop itself: nobody may hang on it
            logger.exception("engine loop died")
            self._dead = EngineDeadError(f"the engine loop died: {type(error).__name__}: {error}")
        finally:
            with self._commands.condition:
                self._dead = self._dead or EngineDeadError("the engine was shut down")
                pending = list(self._commands.queue)
                self._commands.queue.clear()
            streams = list(self._streams.values()) + [c.stream for c in pending if isinstance(c, _Add)]
            self._streams.clear()
            for stream in streams:
                self._fail(stream, self._dead)
            self._flush()

    def run_iteration(self, wait: bool = False) -> bool:
        """One turn of the engine loop: admit and abort what clients sent, run one step if
        there is work, publish. The engine thread calls it back to back, waiting for work;
        without that thread the owner calls it, from one thread at a time and off the event
        loop (a step blocks). False when it did nothing: no commands and no work, or shutdown
        was asked for (with wait, only the latter)."""
        commands = self._next_commands(wait)
        if commands is None or not (commands or self.engine.has_unfinished_requests()):
            return False
        self._iteration(commands)
        return True

    def _next_commands(self, wait: bool) -> list | None:
        """The commands sent since the last iteration (waiting, if asked, until there are some
        or the engine has work); None once shutdown was asked for."""
        with self._commands.condition:
            while wait and not (self._stopping or self._commands.queue or self.engine.has_unfinished_requests()):
                self._commands.condition.wait()
            if self._stopping:
                return None
            commands = list(self._commands.queue)
            self._commands.queue.clear()
            return commands

    def _iteration(self, commands: list) -> None:
        """Admit and abort, run one step if there is work, then publish."""
        for command in commands:
            self._apply(command)
        if self.engine.has_unfinished_requests():
            self._step()
        # The snapshot first: a client that sees its request end sees its blocks free.
        self.latest_load = self.engine.load()
        self._flush()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            stream = self._streams.pop(command.request_id, None)
            if stream is not None:
                output = self.engine.abort_request(command.request_id)  # frees its blocks now
                self._finish_early(command.request_id, "abort")
                if output is not None:  # its last output: finish_reason "abort"
                    self._deliver(stream, stream.put, output)
                else:
                    self._fail(stream, RequestFailedError(f"request {command.request_id} was aborted"))
            return
        stream = command.stream
        if command.request_id in self._streams:
            self._deliver(stream, stream.fail, ValueError(f"request_id {command.request_id!r} is already in use"))
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        except ValueError as error:
            self._deliver(stream, stream.fail, error)
            return
        self._streams[command.request_id] = stream
        self._deliver(stream, stream.admit)

    def _step(self) -> None:
        try:
            outputs = self.engine.step(self._stream_tokens)
        except Exception as error:
            logger.exception("engine step failed; failing the requests it held")
            failure = RequestFailedError(f"the engine step failed: {type(error).__name__}: {error}")
            for request_id in list(self._streams):
                self.engine.abort_request(request_id)
                self._finish_early(request_id, "error")
                self._fail(self._streams.pop(request_id), failure)
            return
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if self.on_output is not None:
                self.on_output(output)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            self._deliver(stream, stream.put, output)

    def _stream_tokens(self, outputs: list[RequestOutput]) -> bool:
        """Within a decode loop, after each step: the running requests' tokens go out now, not
        at the loop's end, so a stream gets a token per step. None has finished (those come
        with the step's outputs). Sent at once rather than through the outbox: a
        data-parallel front calls this from one thread per engine. The loop goes on unless a
        client has sent something (a new request is then admitted without waiting for it)."""
        calls = []
        for output in outputs:
            if self.on_output is not None:
                self.on_output(output)
            stream = self._streams.get(output.request_id)
            if stream is not None:
                calls.append((stream.loop, stream.put, (output,)))
        _post(calls)
        return not self._commands.queue

    def _fail(self, stream: RequestStream, error: BaseException) -> None:
        self._deliver(stream, stream.fail, error)

    def _finish_early(self, request_id: str, reason: str) -> None:
        if self.on_finish_early is not None:
            self.on_finish_early(request_id, reason)

    def _deliver(self, stream: RequestStream, method, *args) -> None:
        """Queue a call on the client's event loop; sent once the iteration is over."""
        self._outbox.append((stream.loop, method, args))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        _post(outbox)


def _post(calls: list[tuple[asyncio.AbstractEventLoop, Callable, tuple]]) -> None:
    """Run (loop, method, args) calls on their event loops, in order: one wake-up of each loop
    for all its calls, not one per call (a step brings an output for each of hundreds of
    streams, and every wake-up is a write to the loop's self-pipe and a turn of its loop)."""
    batches: dict[asyncio.AbstractEventLoop, list[tuple[Callable, tuple]]] = {}
    for loop, method, args in calls:
        batches.setdefault(loop, []).append((method, args))
    for loop, batch in batches.items():
        with contextlib.suppress(RuntimeError):  # the client's event loop is closed: nobody is listening
            loop.call_soon_threadsafe(_run_batch, batch)


def _run_batch(batch: list[tuple[Callable, tuple]]) -> None:
    for method, args in batch:
        try:
            method(*args)
        except Exception:  # as a handle of its own would: logged, and the others still run
            logger.exception("delivering to a request stream failed")
