"""Online serving benchmark in the shape of vLLM's benchmark_serving: ShareGPT-like requests
with Poisson arrivals at several rates, sent by an async HTTP client to a running
OpenAI-compatible server, streamed; request throughput, output tokens/s, and TTFT, TPOT, ITL
and end-to-end latency (mean, median, p99) per rate.

The same workload runs against our server (`python -m paged_jax.server.serve`), vLLM's own
(`vllm.entrypoints.openai.api_server`, from vLLM's CPU build in its own virtual environment,
`.venv-vllm`; see experiments/vllm_offline.py for how it is made) and Hugging Face's
(`transformers serve --continuous-batching`), each started here on the same model, context
and machine. All stay up and take turns, rate by rate, the order rotating: the machine's load
drifts, and one system measured wholly after another would carry the drift. The idle
servers' CPU seconds during another's turn are recorded (`idle_cpu_s`): they must stay near
zero, or the turns would share the cores. Each server computes in its own default dtype
unless `--dtype` is given (vLLM's default on this CPU is bfloat16 for a bfloat16 checkpoint,
ours float32), so a run with `--dtype float32` is the row where both compute alike.
Every system generates every request's full output length: ignore_eos for ours and vLLM's,
an unreachable eos_token_id (`generation_config`) for transformers; the client checks the
token counts.

    python -m experiments.serving_bench --systems paged-jax vllm --dataset random --rates 8 16 32 64
    python -m experiments.serving_bench --systems paged-jax --rates 4 --num-prompts 20
    python -m experiments.serving_bench --base-url http://127.0.0.1:8000 --name mine   # a server already up

Prompts are slices of Python standard-library source (what the embedded model knows), cut to
the workload's prompt lengths in the model's own tokens. Metrics follow vLLM's definitions:
TTFT = first text chunk - send; TPOT = (latency - TTFT) / (output tokens - 1); ITL = the gaps
between a request's chunks; duration = first send to last finish. `--dataset random` is
`vllm bench serve --dataset-name random`'s trace: every prompt --input-len tokens, every
output --output-len.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from experiments.common import device_kind, device_slug, markdown_table, new_figure, publish
from experiments.workloads import SHAREGPT, arrival_times, describe, random_requests, sample_requests

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "stdlib-llama"
SYSTEMS = ("paged-jax", "vllm", "transformers")
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
DEFAULT_RATES = (2.0, 4.0, 8.0, 16.0)
START_TIMEOUT = 900
REQUEST_TIMEOUT = 600
# Our server with its defaults, all step shapes compiled before the first request (so that no
# rate is measured while shapes compile; the start-up time is reported).
PAGED_JAX_FLAGS = ["--no-background-compile"]


@dataclass
class Result:
    """One request as the client saw it."""

    prompt_tokens: int
    max_tokens: int
    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


# -- workload ------------------------------------------------------------------------------------------


def stdlib_corpus() -> str:
    import argparse as a
    import collections
    import dataclasses
    import email.message
    import http.client
    import json as j
    import logging
    import pathlib
    import shutil as s
    import subprocess as sp
    import textwrap
    import typing
    import unittest.case
    return "\n\n".join(inspect.getsource(m) for m in (a, collections, dataclasses, email.message, http.client, j,
                                                      logging, pathlib, s, sp, textwrap, typing, unittest.case))


def make_prompts(model: str, num: int, max_model_len: int, seed: int,
                 fixed: tuple[int, int] | None = None) -> tuple[list[tuple[str, int, int]], str]:
    """[(prompt text, prompt tokens, max_tokens)] with ShareGPT's length distribution (scaled
    to max_model_len), or every prompt and output of the `fixed` (input, output) lengths; and
    the workload's description."""
    from paged_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model)
    corpus = tokenizer.encode(stdlib_corpus(), add_special_tokens=False)
    if fixed:
        requests = random_requests(num, *fixed, seed=seed)
    else:
        requests = sample_requests(SHAREGPT, num, max_model_len=max_model_len, seed=seed)
    rng = np.random.default_rng(seed)
    prompts = []
    for r in requests:
        start = int(rng.integers(0, len(corpus) - r.prompt_len))
        text = tokenizer.decode(corpus[start:start + r.prompt_len])
        length = len(tokenizer.encode(text))  # as the servers count it (decoding can merge tokens)
        prompts.append((text, length, max(1, min(r.output_len, max_model_len - length - 1))))
    if fixed:
        return prompts, f"random: {num} requests, {fixed[0]} prompt tokens and {fixed[1]} output tokens each"
    return prompts, describe(SHAREGPT, requests, max_model_len)


# -- client --------------------------------------------------------------------------------------------


def request_body(system: str, model_name: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if system == "transformers":
        body["generation_config"] = json.dumps({"eos_token_id": -1})  # its way to generate max_tokens
    else:
        body["ignore_eos"] = True
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict, result: Result) -> None:
    start = time.perf_counter()
    last = None
    text = []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                piece = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
                if piece:
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    text.append(piece)
        result.latency = time.perf_counter() - start
        result.ok = last is not None
        if not result.ok:
            result.error = "no text came back"
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"[:200]


async def run_rate(url: str, system: str, model_name: str, prompts, rate: float, seed: int) -> dict:
    """Send every prompt at its Poisson arrival time; wait for all; the rate's metrics."""
    arrivals = arrival_times(len(prompts), rate, 1.0, np.random.default_rng(seed + 1))
    results = [Result(length, max_tokens) for _, length, max_tokens in prompts]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:
        begin = time.perf_counter()

        async def one(i):
            await asyncio.sleep(max(0.0, begin + arrivals[i] - time.perf_counter()))
            await send(client, url, request_body(system, model_name, prompts[i][0], prompts[i][2]), results[i])

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        duration = time.perf_counter() - begin
    return summarize(results, rate, duration)


def summarize(results: list[Result], rate: float, duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out = np.array([r.output_tokens for r in ok], float)

    def stats(values) -> dict:
        values = np.asarray(values, float) * 1000  # ms
        if not len(values):
            return {"mean": None, "median": None, "p99": None}
        return {"mean": float(values.mean()), "median": float(np.median(values)),
                "p99": float(np.percentile(values, 99))}

    return {
        "rate": rate, "num_requests": len(results), "completed": len(ok), "duration_s": duration,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "short_outputs": sum(r.output_tokens < r.max_tokens for r in ok),  # stopped before max_tokens
        "request_throughput": len(ok) / duration, "output_throughput": float(out.sum()) / duration,
        "total_output_tokens": int(out.sum()), "total_prompt_tokens": int(sum(r.prompt_tokens for r in ok)),
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": stats([gap for r in ok for gap in r.itl]),
        # A server that falls behind sends several tokens in one chunk: gaps between chunks
        # (ITL) then hide how long the tokens waited; TPOT does not.
        "tokens_per_chunk": float(out.sum() / sum(len(r.itl) + 1 for r in ok)) if ok else None,
        "e2el_ms": stats([r.latency for r in ok]),
    }


# -- servers ---------------------------------------------------------------------------------------------


def served_model(url: str) -> str:
    """The name a running server serves its model under (what requests must name)."""
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(system: str, model: str, max_model_len: int, dtype: str, port: int,
                   extra: list[str] = ()) -> list[str]:
    if system == "paged-jax":
        return [sys.executable, "-m", "paged_jax.server.serve", model, "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", str(max_model_len), "--dtype", dtype, "--uvicorn-log-level", "warning",
                *PAGED_JAX_FLAGS, *extra]
    if system == "vllm":
        return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                "--port", str(port), "--max-model-len", str(max_model_len), "--dtype", dtype,
                "--uvicorn-log-level", "warning"]
    transformers = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    return [transformers, "serve", model, "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", str(max_model_len), "--dtype", dtype, "--log-level", "warning"]


class Server:
    """A server subprocess, up once /health answers, stopped (its process group) on exit."""

    def __init__(self, system: str, model: str, max_model_len: int, dtype: str, log: Path, extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = server_command(system, model, max_model_len, dtype, self.port, list(extra))
        self.log = log
        self.startup_seconds = 0.0

    def __enter__(self) -> Server:
        start = time.perf_counter()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4"))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.startup_seconds = time.perf_counter() - start
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"no /health within {START_TIMEOUT} s; see {self.log}")

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        except ProcessLookupError:
            pass


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process, its threads and its live descendants
    (vLLM's engine core is a child process of its API server), from Linux's /proc."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = path.read_text().rsplit(")", 1)[1].split()
            stats[int(path.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, ticks
    tree = {pid}
    while more := {child for child, (parent, _) in stats.items() if parent in tree and child not in tree}:
        tree |= more
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def warm(url: str, system: str, model_name: str, prompts, seed: int) -> None:
    """Warm-up, not measured: one request (vLLM's benchmark sends a test request), then 32 at
    once, so that each server has seen the batch sizes the rates bring (a server that builds
    its kernels or graphs for a shape the first time it meets it pays for it here)."""
    asyncio.run(run_rate(url, system, model_name, prompts[:1], float("inf"), seed))
    asyncio.run(run_rate(url, system, model_name, prompts[:32], float("inf"), seed))


def bench_rate(url: str, system: str, model_name: str, prompts, rate: float, seed: int,
               pid: int | None = None) -> dict:
    """One rate's row; with the server's pid, its CPU seconds (all its threads) per 1,000 output
    tokens: what serving costs the machine, steadier than a time on a shared one."""
    before = _cpu_seconds(pid) if pid else None
    row = asyncio.run(run_rate(url, system, model_name, prompts, rate, seed))
    if pid and row["total_output_tokens"]:
        row["cpu_s_per_1k_tokens"] = 1000 * (_cpu_seconds(pid) - before) / row["total_output_tokens"]
    print(f"{system} rate {rate}: {row['completed']}/{row['num_requests']} done in {row['duration_s']:.1f} s, "
          f"{row['output_throughput']:.0f} tok/s, median TTFT {row['ttft_ms']['median']} ms", flush=True)
    return row


# -- report ----------------------------------------------------------------------------------------------


def table(data: dict) -> str:
    header = ["system", "rate (req/s)", "done", "req/s", "output tok/s", "TTFT mean / median / p99 (ms)",
              "TPOT mean / median / p99 (ms)", "ITL mean / median / p99 (ms)", "tokens per chunk",
              "E2E mean / median / p99 (ms)", "server CPU s per 1k output tokens", "idle server's CPU (s)"]

    def three(s):
        return " / ".join("-" if s[k] is None else f"{s[k]:.0f}" for k in ("mean", "median", "p99"))

    rows = []
    for system, run in data["systems"].items():
        for r in run.get("rates", []):
            rows.append([system, f"{r['rate']:g}", f"{r['completed']}/{r['num_requests']}",
                         f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.0f}", three(r["ttft_ms"]),
                         three(r["tpot_ms"]), three(r["itl_ms"]),
                         "-" if r.get("tokens_per_chunk") is None else f"{r['tokens_per_chunk']:.2f}",
                         three(r["e2el_ms"]), f"{r['cpu_s_per_1k_tokens']:.2f}" if "cpu_s_per_1k_tokens" in r else "-",
                         f"{r['idle_cpu_s']:.2f}" if "idle_cpu_s" in r else "-"])
    lines = [data["workload"], "", markdown_table(header, rows), ""]
    for system, run in data["systems"].items():
        if run.get("error"):
            lines.append(f"- **{system} could not be measured**: {run['error']}")
        else:
            lines.append(f"- {system}: `{' '.join(run['command'])}` (up in {run['startup_seconds']:.0f} s)")
            short = sum(r["short_outputs"] for r in run["rates"])
            if short:
                lines.append(f"  - {short} requests stopped before their max_tokens")
            for r in run["rates"]:
                if r["errors"]:
                    lines.append(f"  - rate {r['rate']:g} errors: {r['errors']}")
    lines += ["", *comparison(data)]
    return "\n".join(lines)


def comparison(data: dict) -> list[str]:
    ours = data["systems"].get("paged-jax", {}).get("rates")
    lines = []
    for peer in SYSTEMS[1:]:
        theirs = data["systems"].get(peer, {}).get("rates")
        if not ours or not theirs:
            continue
        lines += [f"Ours against {peer}, rate by rate:", ""]
        for a, b in zip(ours, theirs):
            lines.append(
                f"- rate {a['rate']:g} req/s: output {a['output_throughput']:.0f} vs {b['output_throughput']:.0f} "
                f"tok/s ({_ratio(b['output_throughput'], a['output_throughput'], 'higher')}); median TPOT "
                f"{a['tpot_ms']['median']:.1f} vs {b['tpot_ms']['median']:.1f} ms "
                f"({_ratio(a['tpot_ms']['median'], b['tpot_ms']['median'], 'lower')}); median TTFT "
                f"{a['ttft_ms']['median']:.1f} vs {b['ttft_ms']['median']:.1f} ms "
                f"({_ratio(a['ttft_ms']['median'], b['ttft_ms']['median'], 'lower')}); median ITL "
                f"{a['itl_ms']['median']:.1f} vs {b['itl_ms']['median']:.1f} ms at "
                f"{a.get('tokens_per_chunk') or 0:.2f} vs {b.get('tokens_per_chunk') or 0:.2f} tokens per chunk")
        lines.append("")
    return lines


def _ratio(ours: float, theirs: float, better: str) -> str:
    """'1.3x lower' when ours is the smaller (better) value, else 'ours 1.3x higher'."""
    worse = {"lower": "higher", "higher": "lower"}[better]
    if ours <= theirs:
        return f"ours {theirs / ours:.2f}x {better}"
    return f"ours {ours / theirs:.2f}x {worse}"


def plot(data: dict):
    fig, (ax_ttft, ax_tpot) = new_figure(ncols=2)
    for system, run in data["systems"].items():
        rates = run.get("rates") or []
        if not rates:
            continue
        x = [r["rate"] for r in rates]
        ax_ttft.plot(x, [r["ttft_ms"]["median"] for r in rates], "o-", label=f"{system} median")
        ax_ttft.plot(x, [r["ttft_ms"]["p99"] for r in rates], "x--", alpha=0.6, label=f"{system} p99")
        ax_tpot.plot(x, [r["tpot_ms"]["median"] for r in rates], "o-", label=f"{system} median")
        ax_tpot.plot(x, [r["tpot_ms"]["p99"] for r in rates], "x--", alpha=0.6, label=f"{system} p99")
    for ax, name in ((ax_ttft, "TTFT (ms)"), (ax_tpot, "TPOT (ms)")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Online serving, {data['model_name']} on {data['machine']}")
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--base-url", help="bench this running server instead of starting the systems")
    parser.add_argument("--name", default="server", help="the system's name with --base-url")
    parser.add_argument("--server-pid", type=int, help="with --base-url: the server's process, for its CPU time")
    parser.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES))
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--dataset", choices=("sharegpt", "random"), default="sharegpt")
    parser.add_argument("--input-len", type=int, default=100, help="prompt tokens with --dataset random")
    parser.add_argument("--output-len", type=int, default=100, help="output tokens with --dataset random")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--dtype", default="auto", help="every server's dtype (auto: each its own default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more flags for our server (last on the line), e.g. --num-scheduler-steps 4")
    parser.add_argument("--output", default=None, help="results/<name>.md (default serving_<device>)")
    args = parser.parse_args(argv)

    fixed = (args.input_len, args.output_len) if args.dataset == "random" else None
    prompts, workload = make_prompts(args.model, args.num_prompts, args.max_model_len, args.seed, fixed)
    model_name = args.model
    data = {"machine": device_kind(), "date": time.strftime("%Y-%m-%d"), "model_name": Path(args.model).name,
            "workload": (f"Model `{Path(args.model).name}` ({args.dtype}), context {args.max_model_len}; {workload}; "
                         "prompts "
                         f"cut from standard-library source; Poisson arrivals; greedy, every request generating "
                         f"its max_tokens; streamed."), "systems": {}}
    if args.base_url:
        model_name = served_model(args.base_url)
        warm(args.base_url, "paged-jax", model_name, prompts, args.seed)
        data["systems"][args.name] = {"command": ["(already running)", args.base_url], "startup_seconds": 0.0,
                                      "rates": [bench_rate(args.base_url, "paged-jax", model_name, prompts, rate,
                                                           args.seed, args.server_pid) for rate in args.rates]}
    # The servers stay up and take turns, rate by rate (the first to go rotates): the machine's
    # load drifts, and one system measured after the other would carry the drift.
    with contextlib.ExitStack() as stack:
        servers = {}
        for system in ([] if args.base_url else args.systems):
            log = Path(tempfile.gettempdir()) / f"serving_bench_{system}.log"
            try:
                extra = args.server_args if system == "paged-jax" else []
                server = stack.enter_context(Server(system, args.model, args.max_model_len, args.dtype, log, extra))
                warm(server.url, system, model_name, prompts, args.seed)
                servers[system] = server
                program = {"paged-jax": "python", "vllm": ".venv-vllm/bin/python"}.get(system, "transformers")
                data["systems"][system] = {"command": [program, *server.command[1:]],
                                           "startup_seconds": server.startup_seconds, "rates": []}
            except (RuntimeError, OSError) as error:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                data["systems"][system] = {"error": f"{error} {' | '.join(tail)}"[:600]}
                print(f"{system}: {data['systems'][system]['error']}", file=sys.stderr)
        for i, rate in enumerate(args.rates if servers else []):
            order = list(servers)
            for system in order[i % len(order):] + order[:i % len(order)]:
                others = [servers[o].process.pid for o in servers if o != system]
                before = sum(map(_cpu_seconds, others))
                row = bench_rate(servers[system].url, system, model_name, prompts, rate, args.seed,
                                 servers[system].process.pid)
                row["idle_cpu_s"] = round(sum(map(_cpu_seconds, others)) - before, 2)
                data["systems"][system]["rates"].append(row)
    name = args.output or f"serving_{device_slug()}"
    publish(name, "Online serving: our OpenAI server against vLLM's and `transformers serve`", table(data), data,
            plot(data))
    return data


if __name__ == "__main__":
    main()
