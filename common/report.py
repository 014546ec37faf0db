"""Presets, output files and the claims table every notebook ends with (docs/notebooks.md).

A notebook opens a :class:`Notebook` session with its preset table and override knobs; the session
resolves the preset, fixes the thread count, names the outputs after the preset *and* the
overrides (``fig2_misalignment.quick+seeds=0-1-2.png``), stamps figures made from the stand-in
data, and writes the claims JSON with the environment, the git commit and the measured times.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import budget, cache
from .data import REPO_ROOT
from .train import malloc_keeps_freed_memory, reproducible

PRESETS = ("smoke", "quick", "paper")


#: Environment variable naming a file to which :meth:`Notebook.write_claims` appends the path of each claims JSON.
CLAIMS_LOG = "CLAIMS_LOG"


def resolve_preset(preset: str) -> str:
    """``"auto"`` -> ``"paper"`` when CUDA is available, else ``"quick"``; others unchanged."""
    if preset == "auto":
        return "paper" if torch.cuda.is_available() else "quick"
    if preset not in PRESETS:
        raise ValueError(f"PRESET must be 'auto' or one of {PRESETS}, got {preset!r}")
    return preset


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return "-".join(_short(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("/", "_").replace(" ", "")


def output_tag(preset: str, overrides: dict, fake: bool = False) -> str:
    """``<preset>[+knob=value...][-standin]``: the suffix of every output of a run, so a run with
    changed knobs never overwrites the preset's own files."""
    tag = preset + "".join(f"+{k}={_short(v)}" for k, v in sorted(overrides.items()))
    return tag + ("-standin" if fake else "")


def figure_dir(fig_dir: Optional[str] = None) -> Path:
    """``fig_dir`` (a notebook parameter), else ``$FIG_DIR``, else ``<repo>/runs/figures``.

    The committed ``figures/`` is written only when asked (``make figures`` passes it), so a
    reader's own runs never overwrite the committed results."""
    path = Path(fig_dir or os.environ.get("FIG_DIR") or REPO_ROOT / "runs" / "figures")
    if not path.is_absolute():
        path = REPO_ROOT / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_model() -> str:
    """The CPU's model name with its family/model numbers from ``/proc/cpuinfo`` (Linux), e.g. ``"AMD EPYC
    (family 26, model 2)"``; else what ``platform`` knows."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
        name = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            name += f" (family {fields['cpu family']}, model {fields['model']})"
        return name
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def environment() -> dict:
    """Device name, CPU model and the instruction set torch's CPU kernels use (results on the CPU depend on it:
    docs/reproducibility.md), torch/python versions, host, thread count, whether malloc kept freed memory (null when
    nothing trained on the CPU in this process) and git commit."""
    dev = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return {
        "device": dev,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "malloc_keeps_freed_memory": malloc_keeps_freed_memory(),
        "git_commit": cache.git_commit(),
    }


_OPS = {
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "in": lambda v, t: t[0] <= v <= t[1],
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def paired_mean(d) -> tuple:
    """The mean of per-seed paired differences ``d (n_seeds,)`` (variant minus baseline, seed by seed) and two
    standard errors of that mean, ``2 * std(d, ddof=1) / sqrt(n)`` (0.0 for one seed): ``(mean, two_se)`` as floats.
    The claims of the transfer notebooks (05, 06, 07) compare the mean with ``two_se`` (docs/protocol.md, Figure 5,
    "Comparisons and claims")."""
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    two_se = 2 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return float(d.mean()), float(two_se)


class Claims:
    """The named checks of a figure. ``check(name, value, op, threshold)`` judges and writes its
    own threshold text (``op`` one of ``< <= > >= in``; ``in`` takes ``(low, high)``); a NaN or
    infinite value fails. ``report(name, value)`` records a measured value without judging it."""

    def __init__(self):
        self.rows = []

    def check(self, name: str, value, op: str, threshold, note: str = "") -> bool:
        if op not in _OPS:
            raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        finite = math.isfinite(value)
        passed = finite and bool(_OPS[op](value, threshold))
        text = f"in [{_fmt(threshold[0])}, {_fmt(threshold[1])}]" if op == "in" else f"{op} {_fmt(threshold)}"
        if not finite:
            note = (note + "; " if note else "") + "non-finite value"
        self.rows.append(
            {
                "claim": name,
                "value": value,
                "op": op,
                "threshold": threshold,
                "threshold_text": text,
                "status": "PASS" if passed else "FAIL",
                "note": note,
            }
        )
        return passed

    def report(self, name: str, value, note: str = "") -> None:
        if isinstance(value, torch.Tensor):
            value = value.item()
        self.rows.append(
            {
                "claim": name,
                "value": value,
                "op": None,
                "threshold": None,
                "threshold_text": "reported",
                "status": "REPORT",
                "note": note,
            }
        )

    @property
    def passed(self) -> int:
        return sum(r["status"] == "PASS" for r in self.rows)

    @property
    def failed(self) -> int:
        return sum(r["status"] == "FAIL" for r in self.rows)

    def table(self) -> str:
        lines = [f"{'status':6}  {'claim':62}  {'value':>10}  threshold"]
        for r in self.rows:
            lines.append(
                f"{r['status']:6}  {r['claim'][:62]:62}  {_fmt(r['value']):>10}  {r['threshold_text']}"
                + (f"  ({r['note']})" if r["note"] else "")
            )
        lines.append(
            f"{self.passed} passed, {self.failed} failed, {len(self.rows) - self.passed - self.failed} reported"
        )
        return "\n".join(lines)


class Notebook:
    """One execution of a figure notebook.

    ``Notebook(PRESET, PRESETS, overrides={"seeds": SEEDS, ...}, fig_dir=FIG_DIR)`` resolves the
    preset, applies the non-None overrides to the preset's dict (``cfg``), fixes the thread count
    (``cfg["threads"]``, when the preset names one) and starts the clock; ``results`` names the
    folder under ``results/`` that ``paper`` runs are exported to. ``set_data(data)``
    records whether the stand-in data is used. ``save_figure`` and ``write_claims`` name their
    files ``<figure>.<tag>.*`` (:func:`output_tag`)."""

    def __init__(
        self,
        preset: str,
        presets: dict,
        overrides: Optional[dict] = None,
        fig_dir: Optional[str] = None,
        results: Optional[str] = None,
    ):
        self.t0 = time.time()
        self.results = results
        self.preset = resolve_preset(preset)
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(self.overrides) - set(presets[self.preset])
        if unknown:
            raise ValueError(f"overrides {sorted(unknown)} are not preset parameters")
        self.cfg = {**presets[self.preset], **self.overrides}
        self.repro = reproducible(self.cfg.get("threads"))
        self.fig_dir = figure_dir(fig_dir)
        self.fake = False
        self.claims = Claims()
        self._ledger0 = len(cache.LEDGER)
        self._plan: Optional[budget.Plan] = None
        print(
            f"preset {self.preset}"
            + (f", overrides {self.overrides}" if self.overrides else "")
            + f"; torch threads {self.repro['threads']}; outputs -> {self.fig_dir}"
        )

    @property
    def tag(self) -> str:
        return output_tag(self.preset, self.overrides, self.fake)

    @property
    def export(self) -> Optional[str]:
        """Folder under ``results/`` that this execution's runs are exported to: the notebook's
        ``results`` name for the ``paper`` preset (runs that took a GPU are committed), else None."""
        return self.results if self.preset == "paper" else None

    def set_data(self, data) -> None:
        self.fake = bool(getattr(data, "fake", False))

    def save_figure(self, fig, figure: str) -> list:
        """Write ``<fig_dir>/<figure>.<tag>.png`` (150 dpi) and ``.pdf``; figures made from the
        stand-in data get a visible stamp. Returns the paths."""
        if self.fake:
            fig.text(
                0.5,
                0.5,
                "STAND-IN DATA (fake_cifar10): not a result",
                ha="center",
                va="center",
                fontsize=22,
                color="red",
                alpha=0.35,
                rotation=20,
                transform=fig.transFigure,
            )
        paths = [self.fig_dir / f"{figure}.{self.tag}.png", self.fig_dir / f"{figure}.{self.tag}.pdf"]
        fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None})
        print("saved", *paths)
        return paths

    def plan(self, max_minutes: Optional[float], hint: str = "") -> budget.Plan:
        """A :class:`common.budget.Plan` for this execution: ``with nb.plan(MAX_MINUTES, "SEEDS"):`` around
        the calls of the notebook's run functions prints which runs are missing and their measured ETA, and
        refuses (``BudgetExceeded``) past ``max_minutes``; ``hint`` names the knobs that shrink the work.
        Its summary goes into the claims JSON."""
        self._plan = budget.Plan(max_minutes, hint=hint)
        return self._plan

    def runs_summary(self) -> dict:
        """The distinct runs this execution used, how each was first obtained (trained now, read from the local
        cache, read from the committed results/), their summed training wall time, and how many were trained on
        each device (``trained_on``: the device each run's history names, e.g. ``{"NVIDIA H200": 6}``). A figure
        re-plotted on a laptop from committed GPU runs thus names the GPU, while ``environment`` names the laptop."""
        runs = list({r.hash: r for r in reversed(cache.LEDGER[self._ledger0 :])}.values())  # first look-up of each run
        devices = Counter(str(r.history.get("device", "not recorded")) for r in runs)
        return {
            "runs": len(runs),
            "computed": sum(r.source == "computed" for r in runs),
            "from_cache": sum(r.source == "cache" for r in runs),
            "from_results": sum(r.source == "results" for r in runs),
            "training_wall_s": round(sum(float(r.history.get("wall_s", 0.0)) for r in runs), 1),
            "trained_on": dict(sorted(devices.items())),
        }

    def write_claims(self, figure: str, extra: Optional[dict] = None) -> Path:
        """Print the claims table and write ``<fig_dir>/<figure>.<tag>.json``."""
        print(self.claims.table())
        path = self.fig_dir / f"{figure}.{self.tag}.json"
        doc = {
            "figure": figure,
            "preset": self.preset,
            "overrides": self.overrides,
            "tag": self.tag,
            "fake_data": self.fake,
            "claims": self.claims.rows,
            "passed": self.claims.passed,
            "failed": self.claims.failed,
            "config": self.cfg,
            "environment": environment(),
            "reproducibility": self.repro,
            "code_fingerprint": cache.code_fingerprint(),
            "wall_s": round(time.time() - self.t0, 1),
            "run_sources": self.runs_summary(),
            "plan": self._plan.summary() if self._plan else None,
            **(extra or {}),
        }
        path.write_text(json.dumps(doc, indent=1, default=str))
        if os.environ.get(CLAIMS_LOG):  # the runner (common.notebooks) counts the claims of the files listed there
            with open(os.environ[CLAIMS_LOG], "a") as log:
                log.write(f"{path.resolve()}\n")
        print(f"claims -> {path}; this execution took {doc['wall_s']:.0f} s")
        return path
