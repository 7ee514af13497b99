"""`make notebooks`: execute every notebook in notebooks/ in place, so each is committed with its
tables and plots and a reader sees the figures without running anything.

A notebook picks its size from PAGED_JAX_NOTEBOOK_SIZE, which this sets for the kernel (quick
by default). The figure notebooks do not measure again what `make run` measured: their data
come from common.load_or_measure, which reads the results/<name>.json the last run at that
size left on this device (and measures only when there is none). The tests execute the same
way at the tiny size, in memory.

Run `python -m experiments.notebooks [--size tiny|quick|full] [--dir DIR] [name ...]` (names:
notebook stems, default all).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SIZES = ("tiny", "quick", "full")
TIMEOUT = 3600  # seconds per cell: a figure measured at the full size takes long


def execute(notebook: nbformat.NotebookNode, size: str, directory: Path = NOTEBOOKS) -> nbformat.NotebookNode:
    """Run the notebook top to bottom at a size, in a fresh kernel working in directory; its
    old outputs are cleared first, so what it shows afterwards is this run's."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(notebook, timeout=TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(directory)}})
    return client.execute(env={**os.environ, "PAGED_JAX_NOTEBOOK_SIZE": size})


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="quick")
    parser.add_argument("--dir", type=Path, default=NOTEBOOKS, help="where the notebooks are (default notebooks/)")
    parser.add_argument("names", nargs="*", help="notebooks to run, by stem (default: all)")
    args = parser.parse_args(argv)
    paths = [args.dir / f"{name}.ipynb" for name in args.names] or sorted(args.dir.glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        notebook = execute(nbformat.read(path, as_version=4), args.size, args.dir)
        nbformat.write(notebook, path)
        print(f"{path.name}: executed at the {args.size} size in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


if __name__ == "__main__":
    main()
