"""The notebook runner (`make figures`): both engines run a notebook with overridden parameters,
write what it writes, and name the failing cell."""

import json

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
plt.plot([1, 2]); plt.show()
out = pathlib.Path(FIG_DIR)
out.mkdir(parents=True, exist_ok=True)
(out / f"t.{PRESET}.json").write_text(json.dumps({"passed": VALUE, "failed": 0}))
"""


@pytest.mark.parametrize("engine", ["inprocess", "papermill"])
def test_engines_override_parameters_and_count_claims(tmp_path, engine):
    if engine == "papermill" and not NB.have_papermill():
        pytest.skip("papermill not installed")
    nb = _notebook(tmp_path / "99_t.ipynb", BODY)
    row = NB.run_notebook(nb, "smoke", tmp_path / "figs", tmp_path / "out", engine, {"VALUE": 3})
    assert row["error"] is None and row["engine"] == engine
    assert row["passed"] == 3 and row["failed"] == 0
    assert json.loads((tmp_path / "figs" / "t.smoke.json").read_text())["passed"] == 3


@pytest.mark.parametrize("engine", ["inprocess", "papermill"])
def test_a_failing_cell_is_named_with_its_error(tmp_path, engine):
    if engine == "papermill" and not NB.have_papermill():
        pytest.skip("papermill not installed")
    nb = _notebook(tmp_path / "98_t.ipynb", "raise ValueError('bad knob: 42')")
    row = NB.run_notebook(nb, "smoke", tmp_path / "figs", tmp_path / "out", engine)
    assert row["error"] == "cell 2: ValueError: bad knob: 42"
