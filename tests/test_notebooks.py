"""The notebooks (one per paper figure, and one that watches the paged KV cache) are committed
executed, with their tables and a plot in the outputs, and run top to bottom at the tiny size
the way `python -m experiments.notebooks` runs them, showing what they are about: the paper's
numbers next to ours."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from experiments import common
from experiments.notebooks import execute

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
SHOWS = {  # text each notebook's markdown outputs must show: a number quoted from the paper, or its subject
    "fig02_memory_waste": "20.4 / 13.3 / 57.3 / 8.9",
    "fig12_13_request_rate": "1.7-2.7x",
    "fig14_16_sharing": "37.6",
    "fig14_17_decoding_rate": "up to 2.2x (vLLM)",
    "fig18a_kernel": "20-26 %",
    "fig18b_block_size": "best at 16-128",
    "fig19_preemption": "20 %",
    "kv_cache": "copy-on-write",
    "kv_dtype": "blocks in the same memory",
    "spec_decode": "tokens per step",
}


def outputs(notebook: nbformat.NotebookNode) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def assert_shown(notebook: nbformat.NotebookNode) -> None:
    shown = outputs(notebook)
    assert not [o for o in shown if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in shown), "no plot shown"


def test_a_figure_at_a_measured_size_is_read_back_not_measured_again(tmp_path, monkeypatch):
    measured = []
    figure = SimpleNamespace(NAME="fig", DEFAULT_SIZE="full", TITLE="a figure", table=lambda data: "",
                             plot=lambda data: None, measure=lambda size, **options: measured.append(size) or {"n": 2})
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    (tmp_path / f"fig_simulated_{common.device_slug()}_quick.json").write_text(json.dumps({"n": 1}))
    assert common.load_or_measure(figure, "quick", simulate=True) == {"n": 1} and not measured
    assert common.load_or_measure(figure, "quick") == {"n": 2}, "no results of this run: measured"
    assert common.load_or_measure(figure, "tiny") == {"n": 2} and measured == ["quick", "tiny"]
    assert json.loads((tmp_path / f"fig_{common.device_slug()}_quick.json").read_text()) == {"n": 2}, "and published"


def test_every_notebook_is_checked():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(SHOWS)


@pytest.mark.parametrize("name", sorted(SHOWS))
def test_notebook_is_committed_executed(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), "commit notebooks executed: make notebooks"
    assert_shown(notebook)


@pytest.mark.parametrize("name", sorted(SHOWS))
def test_notebook_runs_at_tiny_size(name):
    notebook = execute(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4), "tiny")
    assert_shown(notebook)
    assert SHOWS[name] in "".join(o.get("data", {}).get("text/markdown", "") for o in outputs(notebook))
