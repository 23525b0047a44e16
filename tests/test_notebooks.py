"""Both notebooks run top to bottom on a short-run setting and draw the figures they promise."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def figures(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.get("outputs", []))


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), path.name


@pytest.mark.slow
def test_training_then_inference_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("LITECLIP_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("LITECLIP_NOTEBOOK_DIR", str(tmp_path))
    training = execute("training")
    assert figures(training) == 3  # sample images, loss/recall curves, similarity heatmap
    logged = "".join(output.get("text", "") for cell in training.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []))
    assert "epoch 1:" in logged and "mean_recall=" in logged  # per-epoch recall is printed
    # no progress bars stored (a saved copy grew to 489 KB with them): the text is the config and the epoch lines
    assert len(logged) < 20_000 and "it/s]" not in logged
    assert (tmp_path / "model" / "model.safetensors").is_file()
    inference = execute("inference")
    assert figures(inference) == 3  # probability bars, search grid, neighbours
