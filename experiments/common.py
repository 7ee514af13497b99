"""What every benchmark needs: a device description, a careful timer, and a results file."""

from __future__ import annotations

import datetime
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax

RESULTS = Path(__file__).parent / "results"


def device_kind() -> str:
    """E.g. 'NVIDIA H100 80GB HBM3', or the CPU model on a CPU-only machine."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {_cpu_count()} cores)"
    return device.device_kind


def device_slug() -> str:
    device = jax.devices()[0]
    name = "cpu" if device.platform == "cpu" else device.device_kind
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def time_call(fn: Callable[[], jax.Array], *, repeats: int = 5, min_seconds: float = 0.05) -> float:
    """Median seconds per call. Calls are queued back to back and synchronised once per
    batch, so host dispatch overlaps device work as it does in a serving loop."""
    jax.block_until_ready(fn())  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn())
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, min(1000, int(min_seconds / once)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls - 1):
            fn()
        jax.block_until_ready(fn())
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def random_llama_checkpoint(model_config: dict, directory: Path, dtype: str) -> tuple[Path, int]:
    """Save a randomly initialised Llama of the given shape as a Hugging Face checkpoint:
    the cost of a real model without a download. Returns (directory, number of parameters)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_config, tie_word_embeddings=False))
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    return directory, sum(p.numel() for p in model.parameters())


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, body: str) -> Path:
    """Print a benchmark's table and write it to results/<name>.md."""
    print(body)
    path = write_result(name, title, body)
    print(f"\nwrote {path}")
    return path


def write_result(name: str, title: str, body: str) -> Path:
    """Write results/<name>.md with the machine, date, versions and the command that made it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    main = sys.modules["__main__"]
    module = main.__spec__.name if getattr(main, "__spec__", None) else Path(sys.argv[0]).stem
    command = " ".join(["python -m", module, *sys.argv[1:]])
    header = (
        f"# {title}\n\n"
        f"- machine: {device_kind()}\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- jax {jax.__version__}, python {platform.python_version()}\n"
        f"- command: `{command}`\n\n"
    )
    path.write_text(header + body + "\n")
    return path
