"""Execute the notebooks headless with papermill and summarise their claims (``make figures``).

    python -m common.notebooks [--preset auto] [--only 02] [--fig-dir figures]

Executed copies go to ``runs/notebooks/``; each notebook writes its figures and claims JSON to
``figures/``. Prints one line per notebook and a closing table (notebook, preset, wall time,
claims passed/failed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .data import REPO_ROOT
from .report import resolve_preset


def run_notebook(nb: Path, preset: str, fig_dir: Path, out_dir: Path) -> dict:
    import papermill as pm
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"PRESET": preset, "FIG_DIR": str(fig_dir)}
    t0 = time.time()
    error = None
    try:
        pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params, cwd=str(nb.parent),
                            progress_bar=False, kernel_name="python3")
    except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    wall = time.time() - t0
    passed = failed = None
    real = resolve_preset(preset)
    for js in sorted(fig_dir.glob(f"*.{real}.json")):
        if js.stat().st_mtime >= t0:  # written by this execution
            doc = json.loads(js.read_text())
            passed = (passed or 0) + doc["passed"]
            failed = (failed or 0) + doc["failed"]
    return {"notebook": nb.name, "preset": real, "wall_s": wall, "passed": passed,
            "failed": failed, "error": error}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="auto")
    ap.add_argument("--only", default=None, help="run only notebooks whose name starts with this")
    ap.add_argument("--fig-dir", default=str(REPO_ROOT / "figures"))
    ap.add_argument("--out-dir", default=str(REPO_ROOT / "runs" / "notebooks"))
    args = ap.parse_args(argv)
    nbs = sorted((REPO_ROOT / "notebooks").glob("[0-9]*.ipynb"))
    if args.only:
        nbs = [nb for nb in nbs if nb.name.startswith(args.only)]
    if not nbs:
        print("no notebooks to run" + (f" matching {args.only!r}" if args.only else " yet"))
        return 0
    rows = []
    for nb in nbs:
        print(f"[{len(rows) + 1}/{len(nbs)}] {nb.name} (preset {resolve_preset(args.preset)}) ...", flush=True)
        row = run_notebook(nb, args.preset, Path(args.fig_dir), Path(args.out_dir))
        rows.append(row)
        status = row["error"] or f"claims {row['passed']} passed, {row['failed']} failed"
        print(f"    done in {row['wall_s']:.0f} s: {status}", flush=True)
    print(f"\n{'notebook':34} {'preset':7} {'wall':>8} {'passed':>7} {'failed':>7}")
    for r in rows:
        print(f"{r['notebook']:34} {r['preset']:7} {r['wall_s']:7.0f}s {str(r['passed']):>7} "
              f"{str(r['failed']):>7}" + (f"  ERROR {r['error']}" if r["error"] else ""))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
