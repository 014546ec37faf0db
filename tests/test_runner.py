"""The notebook runner (`make figures`): both engines run a notebook with overridden parameters,
write what it writes, and name the failing cell."""

import json
import os

import pytest

from common import notebooks as NB


def _notebook(path, body):
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": ["# test"]},
        {
            "cell_type": "code",
            "metadata": {"tags": ["parameters"]},
            "execution_count": None,
            "outputs": [],
            "source": ['PRESET = "auto"\n', "FIG_DIR = None\n", "VALUE = 1\n"],
        },
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": [body]},
    ]
    for i, cell in enumerate(cells):
        cell["id"] = f"c{i}"
    doc = {
        "cells": cells,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(doc))
    return path


BODY = """
import json, pathlib
import matplotlib.pyplot as plt
import common as C
plt.plot([1, 2]); plt.show()
nb = C.Notebook(PRESET, {p: {} for p in ("smoke", "quick", "paper")}, {}, FIG_DIR)
for i in range(VALUE):
    nb.claims.check(f"claim {i}", 1.0, ">", 0.0)
nb.claims.check("a failing claim", 0.0, ">", 1.0)
nb.write_claims("t")
# a claims-like file that this notebook did not write through write_claims: not counted
(pathlib.Path(FIG_DIR) / "other.json").write_text(json.dumps({"passed": 100, "failed": 100}))
"""


@pytest.mark.parametrize("engine", ["inprocess", "papermill"])
def test_engines_override_parameters_and_count_claims(tmp_path, engine):
    if engine == "papermill" and not NB.have_papermill():
        pytest.skip("papermill not installed")
    nb = _notebook(tmp_path / "99_t.ipynb", BODY)
    row = NB.run_notebook(nb, "smoke", tmp_path / "figs", tmp_path / "out", engine, {"VALUE": 3})
    assert row["error"] is None and row["engine"] == engine
    assert row["passed"] == 3 and row["failed"] == 1
    assert json.loads((tmp_path / "figs" / "t.smoke.json").read_text())["passed"] == 3
    assert "CLAIMS_LOG" not in os.environ  # restored after the execution


@pytest.mark.parametrize("engine", ["inprocess", "papermill"])
def test_a_failing_cell_is_named_with_its_error(tmp_path, engine):
    if engine == "papermill" and not NB.have_papermill():
        pytest.skip("papermill not installed")
    nb = _notebook(tmp_path / "98_t.ipynb", "raise ValueError('bad knob: 42')")
    row = NB.run_notebook(nb, "smoke", tmp_path / "figs", tmp_path / "out", engine)
    assert row["error"] == "cell 2: ValueError: bad knob: 42"
