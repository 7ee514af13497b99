"""Compiling the step shapes: JAX's persistent cache, and a background queue that never puts
a compile on the serving path.

Start-up used to compile every step shape before the first request: a minute for a small
model, again at every start. Two things shorten it:

- JAX's persistent compilation cache is on by default, so a second start of the same
  configuration loads its executables from disk. The directory is JAX_COMPILATION_CACHE_DIR
  when set, else `$XDG_CACHE_HOME/paged_jax/jax` (`~/.cache/...`);
  PAGED_JAX_COMPILATION_CACHE=0 or `EngineArgs(compilation_cache=False)` turn it off.
- Only the shapes that cover every step (the largest bucket of each kind) are compiled
  before serving; the others follow on a background thread. A shape a step wanted and did
  not find is compiled at once; the others, smallest first, only while the engine is idle
  (no step for IDLE_SECONDS): on two cores a compile takes one of them, and a first batch run
  while every shape compiles beside it ran at 0.26x its steady speed. Until a shape is ready,
  the runner pads its step to the smallest ready bucket that fits: slower for a while, never
  a compile while a request waits.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

logger = logging.getLogger(__name__)
CACHE_ENV = "PAGED_JAX_COMPILATION_CACHE"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
IDLE_SECONDS = 0.25  # no step for this long: the engine is idle, unwanted shapes may compile

_local = threading.local()  # per thread, since a compile reports its cache hit in its own thread
_workers: weakref.WeakSet[Executables] = weakref.WeakSet()


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "paged_jax" / "jax"


def configure_persistent_cache(enabled: bool = True) -> str | None:
    """Turn JAX's persistent compilation cache on (or off) for this process; returns its
    directory. A directory the user chose (JAX_COMPILATION_CACHE_DIR, jax.config) is kept.
    Every entry is kept, however fast it compiled: our step shapes compile in about a second
    each, under JAX's default one-second threshold, and there are dozens."""
    if not enabled or os.environ.get(CACHE_ENV, "1").lower() in ("0", "false", "off"):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = jax.config.jax_compilation_cache_dir or str(default_cache_dir())
    if (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache) != (directory, True):
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_enable_compilation_cache", True)
        jax_cache.reset_cache()  # JAX decides once per process whether to use it: decide again
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return directory


def _count_cache_hit(event: str, **_) -> None:
    if event == _CACHE_HIT:
        _local.hits = getattr(_local, "hits", 0) + 1


jax.monitoring.register_event_listener(_count_cache_hit)


class Executables:
    """Compiled step functions by key, built on demand or queued for a background thread.

    `get` returns a ready executable or None; `build` makes one now (warm-up, or a shape the
    warm-up set lacks); `queue` hands tasks to the background thread, one compile at a time
    (they share the cores with serving), and `want` moves a queued one to the front: the shape
    a step wanted and did not find is the next one compiled, so that step's successors are
    padded to a larger shape for one compile at most. Shapes nobody wanted wait until the
    engine has been idle for IDLE_SECONDS (`used` marks each step). The thread stops when its
    owner is garbage collected or the interpreter exits."""

    def __init__(self):
        self._ready: dict[Hashable, Callable] = {}
        self._queued: OrderedDict[Hashable, Callable[[], Callable]] = OrderedDict()  # next first
        self._building: Hashable | None = None  # taken off the queue, being compiled
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wanted: set[Hashable] = set()
        self._last_used = 0.0  # time.monotonic() of the latest step
        self.built = 0  # executables built (from the persistent cache or by compiling)
        self.from_cache = 0  # of which loaded from the persistent cache
        self.seconds = 0.0  # spent building them

    def get(self, key: Hashable) -> Callable | None:
        return self._ready.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._ready

    def known(self, key: Hashable) -> bool:
        """Ready, queued for the background thread or being built there."""
        return key in self._ready or key in self._queued or key == self._building

    def build(self, key: Hashable, make: Callable[[], Callable]) -> Callable:
        """make() lowers and compiles (or warms a jit cache and returns its callable)."""
        if key in self._ready:
            return self._ready[key]
        hits, start = getattr(_local, "hits", 0), time.perf_counter()
        executable = make()
        with self._changed:
            self.seconds += time.perf_counter() - start
            self.built += 1
            self.from_cache += getattr(_local, "hits", 0) > hits
            self._ready[key] = executable
            self._queued.pop(key, None)
            self._wanted.discard(key)
        return executable

    def queue(self, tasks: list[tuple[Hashable, Callable[[], Callable]]]) -> None:
        """Build tasks in order on the background thread, after those already queued."""
        with self._changed:
            for key, make in tasks:
                if not self.known(key):
                    self._queued[key] = make
            if self._queued and self._thread is None and not self._closed:
                self._thread = threading.Thread(target=_work, args=(weakref.ref(self),), name="paged-jax-compile",
                                                daemon=True)
                _workers.add(self)
                self._thread.start()

    def want(self, key: Hashable) -> None:
        """A step wanted key and it is not ready: compile it next, if it is queued."""
        with self._changed:
            if key in self._queued:
                self._queued.move_to_end(key, last=False)
                self._wanted.add(key)
                self._changed.notify_all()

    def used(self) -> None:
        """A step ran: the engine is busy, shapes nobody wanted wait."""
        self._last_used = time.monotonic()

    @property
    def pending(self) -> int:
        return len(self._queued) + (self._building is not None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background queue is done; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._thread is None, timeout)

    def close(self) -> None:
        """Stop the background thread after the executable it is building."""
        with self._changed:
            self._closed = True
            self._queued.clear()
            self._changed.notify_all()
        self.wait()

    def _next(self) -> tuple[Hashable, Callable[[], Callable]] | None:
        """The background thread's next task: a wanted one at once, another once the engine
        is idle; None (and the thread ends) when there is none."""
        with self._changed:
            self._building = None
            while not self._closed and self._queued and next(iter(self._queued)) not in self._wanted:
                idle = time.monotonic() - self._last_used
                if idle >= IDLE_SECONDS:
                    break
                self._changed.wait(IDLE_SECONDS - idle)
            if self._closed or not self._queued:
                self._thread = None
                self._changed.notify_all()
                return None
            key, make = self._queued.popitem(last=False)
            self._wanted.discard(key)
            self._building = key
            return key, make


def _work(owner_ref: weakref.ref) -> None:
    start, count = time.perf_counter(), 0
    while (owner := owner_ref()) is not None and (task := owner._next()) is not None:
        key, make = task
        try:
            owner.build(key, make)
            count += 1
        except Exception:  # noqa: BLE001 - the shape stays unready; serving pads to a larger one
            # After close (the interpreter is exiting) the result would be thrown away anyway;
            # a lowering cut across by the exit has been seen to fail inside JAX (KeyError:
            # Var(...)), which is no error of the engine's and is not reported.
            if not owner._closed:
                logger.exception("background compile of %s failed", key)
        del owner, task, make
    if (owner := owner_ref()) is not None and not owner._closed:  # at exit, log nothing: the streams may be gone
        logger.info("compiled %d more step shapes in the background in %.1f s", count, time.perf_counter() - start)


@atexit.register
def _stop_workers() -> None:
    """At exit, let each background thread finish only the executable it is building."""
    for executables in list(_workers):
        executables.close()
