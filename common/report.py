"""Presets, figure files and the claims table every notebook ends with (CONVENTIONS.md)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

from .data import REPO_ROOT

PRESETS = ("smoke", "quick", "paper")
_T0 = time.time()  # import time of the library: the start of a notebook's run


def resolve_preset(preset: str) -> str:
    """``"auto"`` -> ``"paper"`` when CUDA is available, else ``"quick"``; others unchanged."""
    if preset == "auto":
        return "paper" if torch.cuda.is_available() else "quick"
    if preset not in PRESETS:
        raise ValueError(f"PRESET must be 'auto' or one of {PRESETS}, got {preset!r}")
    return preset


def pick(presets: dict, preset: str, **overrides) -> dict:
    """The preset's parameter dict with every non-None override applied."""
    cfg = dict(presets[preset])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def figure_dir(fig_dir: Optional[str] = None) -> Path:
    """``fig_dir`` (a notebook parameter), else ``$FIG_DIR``, else ``<repo>/figures``."""
    path = Path(fig_dir or os.environ.get("FIG_DIR") or REPO_ROOT / "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, name: str, preset: str, fig_dir: Optional[str] = None) -> list:
    """Write ``<fig_dir>/<name>.<preset>.png`` (150 dpi) and ``.pdf``; return the paths."""
    base = figure_dir(fig_dir)
    paths = [base / f"{name}.{preset}.png", base / f"{name}.{preset}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "common", "notebooks"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Device name, torch version, host, git commit."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "git_commit": _git_commit()}


class Claims:
    """Collects the named checks of a figure: ``add(name, value, threshold, passed)``;
    ``report(...)`` prints the table and writes ``<fig_dir>/<name>.<preset>.json`` (with the wall
    time since ``common`` was imported, i.e. of the notebook's run)."""

    def __init__(self):
        self.rows = []

    def add(self, name: str, value, threshold: str, passed: Optional[bool], note: str = "") -> None:
        """``passed=None`` records a measured value with no pass/fail (reported, not judged)."""
        if isinstance(value, torch.Tensor):
            value = value.item()
        self.rows.append({"claim": name, "value": value, "threshold": threshold,
                          "status": "REPORT" if passed is None else ("PASS" if passed else "FAIL"),
                          "note": note})

    def table(self) -> str:
        def fmt(v):
            return f"{v:.4g}" if isinstance(v, float) else str(v)
        lines = [f"{'status':6}  {'claim':58}  {'value':>10}  threshold"]
        for r in self.rows:
            lines.append(f"{r['status']:6}  {r['claim'][:58]:58}  {fmt(r['value']):>10}  {r['threshold']}"
                         + (f"  ({r['note']})" if r["note"] else ""))
        n_pass = sum(r["status"] == "PASS" for r in self.rows)
        n_fail = sum(r["status"] == "FAIL" for r in self.rows)
        lines.append(f"{n_pass} passed, {n_fail} failed, {len(self.rows) - n_pass - n_fail} reported")
        return "\n".join(lines)

    def report(self, name: str, preset: str, config: dict, fig_dir: Optional[str] = None,
               extra: Optional[dict] = None) -> Path:
        print(self.table())
        path = figure_dir(fig_dir) / f"{name}.{preset}.json"
        doc = {"figure": name, "preset": preset, "claims": self.rows,
               "passed": sum(r["status"] == "PASS" for r in self.rows),
               "failed": sum(r["status"] == "FAIL" for r in self.rows),
               "config": config, "environment": environment(),
               "wall_s": round(time.time() - _T0, 1), **(extra or {})}
        path.write_text(json.dumps(doc, indent=1, default=str))
        return path
