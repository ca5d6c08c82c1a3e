"""The quickstart notebook runs headless from top to bottom (shortened training) and shows its
pictures inline, its last section matching points on two images with sm_eval.match."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import PIL.Image
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(ray_cluster: str, tmp_path: Path, monkeypatch) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Run it in a copy of the repository layout so its data/quickstart lands in tmp_path.
    work = tmp_path / "repo"
    (work / "notebooks").mkdir(parents=True)
    (work / "configs").symlink_to(NOTEBOOK.parents[1] / "configs")
    monkeypatch.setenv("QUICKSTART_EPOCHS", "1")
    monkeypatch.setenv("QUICKSTART_STEPS_PER_EPOCH", "4")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work / "notebooks")}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "val PCK@0.1 before training" in text and "trn: 300 pairs written, 0 rejected" in text
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 1 + 1 + 3 + 1  # preview, PCK curve, three match pictures, matches on one's own images
    assert any("PCK" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert (work / "data" / "quickstart" / "eval" / "report.json").exists()

    # Section 4: sm_eval.match on chelsea and a perspective view of it.
    assert "points matched, mean score" in text and "median error" in text
    match_dir = work / "data" / "quickstart" / "match"
    document = json.loads((match_dir / "matches.json").read_text())
    assert document["count"] == len(document["matches"]) > 0 and document["model"]["kind"] == "simplematch"
    assert all(-1 <= match["score"] <= 1 for match in document["matches"])
    assert PIL.Image.open(match_dir / "matches.png").width > document["target_image"]["width"]
