"""Every notebook is committed without outputs and runs top to bottom with the smoke preset."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no figure notebooks"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_parameters_cell(nb):
    doc = json.loads(nb.read_text())
    code = [c for c in doc["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code)
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and 'PRESET = "auto"' in "".join(params[0]["source"])
    assert doc["cells"][0]["cell_type"] == "markdown" and "Departures from the paper" in "".join(doc["cells"][0]["source"])


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_smoke_run_writes_figure_and_claims(nb, tmp_path):
    import papermill as pm
    figs = tmp_path / "figures"
    pm.execute_notebook(str(nb), str(tmp_path / nb.name), parameters={"PRESET": "smoke", "FIG_DIR": str(figs)},
                        cwd=str(nb.parent), progress_bar=False, kernel_name="python3")
    claims = sorted(figs.glob("*.smoke.json"))
    assert claims, f"{nb.name} wrote no claims JSON"
    for js in claims:
        doc = json.loads(js.read_text())
        assert doc["preset"] == "smoke" and doc["claims"] and "environment" in doc
        stem = js.name[: -len(".smoke.json")]
        assert (figs / f"{stem}.smoke.png").stat().st_size > 10_000
        assert (figs / f"{stem}.smoke.pdf").is_file()
