"""What every benchmark needs: a device description, a careful timer, and a results file."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def result_name(module: str, size: str, default: str) -> str:
    """results/ name of a run: <module>_<device>, suffixed with the size unless it is the
    module's default, so a smoke run never overwrites the reference numbers."""
    return f"{module}_{device_slug()}" + ("" if size == default else f"_{size}")


def run_figure(module, size: str, **options) -> dict:
    """Measure a figure module at a size and publish its table, data and plot; the data.

    A figure module (experiments/<name>.py) has NAME, TITLE, SIZES, DEFAULT_SIZE and
    measure(size, **options) -> JSON-able data, table(data) -> markdown, plot(data) -> a
    matplotlib Figure, headline(data) -> [figure, quantity, paper, ours] rows. Notebooks and
    reproduce.py call these; options are the module's boolean flags (simulate=True runs are
    published as <NAME>_simulated)."""
    data = module.measure(size, **options)
    publish(result_name(figure_label(module, options), size, module.DEFAULT_SIZE), module.TITLE, module.table(data),
            data, module.plot(data))
    return data


def figure_label(module, options: dict) -> str:
    """The results name of a figure module's run with these options, before device and size."""
    return module.NAME + ("_simulated" if options.get("simulate") else "")


def load_or_measure(module, size: str, **options) -> dict:
    """A figure's data at a size: read back from results/<name>.json when a run at that size
    on this device left one (`make run` measures every figure, so a notebook shows its
    numbers without measuring again), else measured and published by run_figure. The tiny
    size, the tests' smoke run, always measures."""
    path = RESULTS / f"{result_name(figure_label(module, options), size, module.DEFAULT_SIZE)}.json"
    if size != "tiny" and path.is_file():
        return json.loads(path.read_text())
    return run_figure(module, size, **options)


def figure_main(module, argv: list[str] | None = None, flags: dict[str, str] | None = None) -> dict:
    """The command line of a figure module: --size, and its boolean flags (name -> help)."""
    parser = argparse.ArgumentParser(description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(module.SIZES), default=module.DEFAULT_SIZE)
    for flag, help in (flags or {}).items():
        parser.add_argument(f"--{flag}", action="store_true", help=help)
    args = vars(parser.parse_args(argv))
    return run_figure(module, args.pop("size"), **args)


def publish(name: str, title: str, body: str, data: dict, figure=None) -> Path:
    """A figure's results: the table (printed and written to results/<name>.md), its data as
    results/<name>.json (what notebooks and reproduce.py read back) and the plot as
    results/<name>.png. The figure is closed once saved: a notebook shows a plot where it
    draws it, not where it publishes it too."""
    path = report(name, title, body)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    if figure is not None:
        import matplotlib.pyplot as plt

        figure.savefig(RESULTS / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
    return path


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6, nrows: int = 1,
               height_ratios: list[float] | None = None):
    """A matplotlib figure and its axes (row by row), drawn off screen (Agg) unless a notebook
    chose a backend; the caller adds a suptitle. height is the height of all rows together."""
    import matplotlib

    if "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height), squeeze=False,
                             gridspec_kw=dict(height_ratios=height_ratios))
    return fig, list(axes.flat)


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
        f"- machine load when written (1 / 5 / 15-minute averages, {_cpu_count()} cores): "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
        f"- command: `{command}`\n\n"
    )
    path.write_text(header + body + "\n")
    return path
