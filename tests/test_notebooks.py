"""The notebooks (one per paper figure) run top to bottom at the tiny size and show the
paper's numbers next to ours, with a plot. They are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
PAPER_NUMBERS = {  # a number each notebook's tables must quote from the paper
    "fig02_memory_waste": "20.4 / 13.3 / 57.3 / 8.9",
    "fig12_13_request_rate": "1.7-2.7x",
    "fig14_16_sharing": "37.6",
    "fig18a_kernel": "20-26 %",
    "fig18b_block_size": "best at 16-128",
    "fig19_preemption": "20 %",
}


def test_every_figure_has_a_notebook():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PAPER_NUMBERS)


@pytest.mark.parametrize("name", sorted(PAPER_NUMBERS))
def test_notebook_runs_at_tiny_size(name, monkeypatch):
    path = NOTEBOOKS / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit notebooks stripped"
    monkeypatch.setenv("PAGED_JAX_NOTEBOOK_SIZE", "tiny")
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot shown"
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert PAPER_NUMBERS[name] in shown
