"""Claims judge themselves and fail non-finite values; outputs are named after preset and overrides;
the run summary counts each run once."""

import json
import math
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from common import cache
from common.report import Claims, Notebook, environment, output_tag, paired_mean


def test_paired_mean_is_the_mean_and_two_standard_errors_of_the_differences():
    """Against the textbook formulas written out by hand: mean, sample variance with n - 1, SE = sqrt(var / n)."""
    d = [0.031, -0.012, 0.047, 0.005]
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1)
    m, two_se = paired_mean(torch.tensor(d, dtype=torch.float64))
    assert m == pytest.approx(mean, rel=1e-14) and two_se == pytest.approx(2 * math.sqrt(var / n), rel=1e-14)
    assert paired_mean([0.2]) == (pytest.approx(0.2), 0.0)  # one seed: no spread to judge against
    assert paired_mean([[0.1, 0.3]]) == paired_mean([0.1, 0.3])  # any shape of n values


def test_checks_write_their_threshold_and_fail_non_finite_values():
    c = Claims()
    assert c.check("a", 0.5, "<", 1.0) and c.rows[-1]["threshold_text"] == "< 1"
    assert not c.check("b", 2.0, "<=", 1.0)
    assert c.check("c", 3, "in", (1, 5)) and c.rows[-1]["threshold_text"] == "in [1, 5]"
    assert not c.check("d", math.nan, ">", 0.0) and "non-finite" in c.rows[-1]["note"]
    assert not c.check("e", math.inf, ">", 0.0)
    assert not c.check("f", math.nan, "<", 0.0)  # NaN fails whichever way the comparison goes
    c.report("g", 7.0)
    assert (c.passed, c.failed) == (2, 4) and c.rows[-1]["status"] == "REPORT"
    with pytest.raises(ValueError):
        c.check("h", 1.0, "==", 1.0)


def test_environment_names_the_cpu_and_the_kernels_instruction_set():
    env = environment()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu_capability"]
    assert env["cpu"] and env["threads"] == torch.get_num_threads()
    if Path("/proc/cpuinfo").is_file() and platform.system() == "Linux":
        out = subprocess.run(["grep", "-m1", "^model name", "/proc/cpuinfo"], capture_output=True, text=True).stdout
        if out:  # the first processor's model name, as grep finds it
            assert env["cpu"].startswith(out.split(":", 1)[1].strip())


def test_output_tag_names_every_override():
    assert output_tag("quick", {}) == "quick"
    assert output_tag("quick", {"seeds": [0, 1, 2], "fc_epochs": 200}) == "quick+fc_epochs=200+seeds=0-1-2"
    assert output_tag("smoke", {}, fake=True) == "smoke-standin"


def test_notebook_session_tags_outputs_and_counts_each_run_once(tmp_path):
    presets = {"smoke": dict(steps=3, seeds=[0]), "quick": dict(steps=5, seeds=[0]), "paper": dict(steps=9, seeds=[0])}
    nb = Notebook("quick", presets, {"steps": 7, "seeds": None}, str(tmp_path))
    assert nb.cfg == {"steps": 7, "seeds": [0]} and nb.tag == "quick+steps=7" and nb.export is None
    calls = []
    key = cache.run_key(z=1)
    fn = lambda scratch: (calls.append(1) or {"wall_s": 2.0}, {})  # noqa: E731
    for _ in range(3):  # the same run looked up three times in one execution
        cache.cached_run(key, fn, root=tmp_path / "c")
    summary = nb.runs_summary()
    assert summary["runs"] == 1 and summary["computed"] == 1 and summary["training_wall_s"] == 2.0
    nb.claims.check("x", 1.0, ">", 0.0)
    doc = json.loads(nb.write_claims("figX").read_text())
    assert (tmp_path / "figX.quick+steps=7.json").is_file() and doc["overrides"] == {"steps": 7}
    assert doc["passed"] == 1 and doc["run_sources"]["runs"] == 1
    assert doc["run_sources"]["trained_on"] == {"not recorded": 1}  # this history names no device
    with pytest.raises(ValueError):
        Notebook("quick", presets, {"lr": 0.1}, str(tmp_path))  # not a preset parameter


def test_runs_read_from_results_name_the_device_that_trained_them(tmp_path, monkeypatch):
    """A re-plot from committed runs: ``environment`` is this machine, ``trained_on`` the GPU of the runs."""
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    presets = {"smoke": {}, "quick": {}, "paper": {}}
    gpu = Notebook("paper", presets, {}, str(tmp_path), results="figX")
    for z, dev in ((1, "NVIDIA H200"), (2, "NVIDIA H200"), (3, "cpu")):
        hist = {"wall_s": 1.0, "device": dev}
        cache.cached_run(cache.run_key(z=z), lambda s, h=hist: (h, {}), root=tmp_path / "gpu", export=gpu.export)
    assert gpu.runs_summary()["trained_on"] == {"NVIDIA H200": 2, "cpu": 1}
    laptop = Notebook("paper", presets, {}, str(tmp_path), results="figX")
    never = lambda scratch: pytest.fail("a committed run was retrained")  # noqa: E731
    for z in (1, 2):
        cache.cached_run(cache.run_key(z=z), never, root=tmp_path / "laptop")
    summary = laptop.runs_summary()
    assert summary["from_results"] == 2 and summary["trained_on"] == {"NVIDIA H200": 2}
