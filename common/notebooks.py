"""Execute the figure notebooks headless and summarise their claims (``make figures``).

    python -m common.notebooks [--preset auto] [--only 02] [--fig-dir figures]
                               [--engine auto|papermill|inprocess] [-p KNOB=VALUE ...]

Two engines give the same outputs:

- ``papermill`` (when installed): a Jupyter kernel runs the notebook; the executed copy, with its
  outputs, goes to ``runs/notebooks/``. Cell output is streamed to the terminal as it comes.
- ``inprocess`` (no Jupyter needed, e.g. on a bare GPU box): the code cells run in this Python
  process, in order, with the parameters cell overridden as papermill does it (the new values are
  assigned right after the ``parameters`` cell), matplotlib on ``Agg`` and ``plt.show`` a no-op.
  A log of the output goes to ``runs/notebooks/<name>.log``.

``auto`` picks papermill when it can be imported, else in-process. Each notebook writes its
figures and claims JSON to ``--fig-dir`` (default: the committed ``figures/``). The closing table
lists notebook, preset, engine, wall time, claims passed/failed and, for a failed notebook, the
cell and the error.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

from .data import REPO_ROOT


def have_papermill() -> bool:
    try:
        import papermill  # noqa: F401
    except ImportError:
        return False
    return True


def code_cells(nb_path: Path) -> list:
    """``[(index, source, is_parameters_cell)]`` for the notebook's code cells, read as plain JSON."""
    doc = json.loads(Path(nb_path).read_text())
    out = []
    for i, cell in enumerate(doc["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        out.append((i, src, "parameters" in cell.get("metadata", {}).get("tags", [])))
    return out


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


class CellError(RuntimeError):
    """A notebook cell raised: ``cell`` (index in the notebook), ``ename``, ``evalue``."""

    def __init__(self, cell, ename, evalue):
        super().__init__(f"cell {cell}: {ename}: {evalue}")
        self.cell, self.ename, self.evalue = cell, ename, evalue


def execute_inprocess(nb_path: Path, parameters: dict, log_path: Path) -> None:
    """Run the notebook's code cells in this process (see the module docstring). Raises
    :class:`CellError` naming the failing cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb_path = Path(nb_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ns = {"__name__": "__main__"}
    old_cwd, old_show = os.getcwd(), plt.show
    with open(log_path, "w") as log, contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(_Tee(sys.__stdout__, log)))
        stack.enter_context(contextlib.redirect_stderr(_Tee(sys.__stderr__, log)))
        os.chdir(nb_path.parent)
        plt.show = lambda *a, **k: None
        try:
            for index, src, is_params in code_cells(nb_path):
                try:
                    exec(compile(src, f"<{nb_path.name} cell {index}>", "exec"), ns)
                    if is_params and parameters:
                        injected = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
                        exec(compile(injected, f"<{nb_path.name} injected parameters>", "exec"), ns)
                except Exception as err:
                    traceback.print_exc()
                    raise CellError(index, type(err).__name__, str(err).splitlines()[0] if str(err) else "") from err
                finally:
                    plt.close("all")
        finally:
            os.chdir(old_cwd)
            plt.show = old_show


def execute_papermill(nb_path: Path, parameters: dict, out_path: Path) -> None:
    """Run the notebook in a Jupyter kernel with papermill, streaming its output. Raises
    :class:`CellError` naming the failing cell."""
    import papermill as pm

    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(nb_path),
            str(out_path),
            parameters=parameters,
            cwd=str(Path(nb_path).parent),
            progress_bar=False,
            kernel_name="python3",
            log_output=True,
            stdout_file=sys.stdout,
            stderr_file=sys.stderr,
        )
    except pm.PapermillExecutionError as err:
        # papermill counts its injected-parameters cell (placed right after the parameters cell)
        params_at = [i for i, _, is_params in code_cells(nb_path) if is_params]
        cell = err.cell_index - (1 if params_at and err.cell_index > params_at[0] else 0)
        raise CellError(cell, err.ename, (err.evalue or "").splitlines()[0] if err.evalue else "") from err


def run_notebook(
    nb: Path, preset: str, fig_dir: Path, out_dir: Path, engine: str = "auto", extra: dict | None = None
) -> dict:
    """Execute one notebook; return its summary row (claims counted from the JSON files it wrote, which
    :meth:`common.report.Notebook.write_claims` lists in the file named by ``$CLAIMS_LOG``)."""
    from .report import CLAIMS_LOG, resolve_preset

    engine = ("papermill" if have_papermill() else "inprocess") if engine == "auto" else engine
    params = {"PRESET": preset, "FIG_DIR": str(fig_dir), **(extra or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    claims_log = out_dir / f"{nb.stem}.claims"
    claims_log.write_text("")
    before = os.environ.get(CLAIMS_LOG)
    os.environ[CLAIMS_LOG] = str(claims_log.resolve())  # inherited by a papermill kernel
    t0 = time.time()
    error = None
    try:
        if engine == "papermill":
            execute_papermill(nb, params, out_dir / nb.name)
        elif engine == "inprocess":
            execute_inprocess(nb, params, out_dir / f"{nb.stem}.log")
        else:
            raise ValueError(f"engine must be auto, papermill or inprocess, got {engine!r}")
    except CellError as err:
        error = str(err)
    finally:
        if before is None:
            os.environ.pop(CLAIMS_LOG, None)
        else:
            os.environ[CLAIMS_LOG] = before
    wall = time.time() - t0
    passed = failed = None
    for js in sorted(set(claims_log.read_text().splitlines())):  # the claims JSON files this execution wrote
        doc = json.loads(Path(js).read_text())
        passed = (passed or 0) + doc["passed"]
        failed = (failed or 0) + doc["failed"]
    return {
        "notebook": nb.name,
        "preset": resolve_preset(preset),
        "engine": engine,
        "wall_s": wall,
        "passed": passed,
        "failed": failed,
        "error": error,
    }


def _parse_knob(text: str):
    name, _, value = text.partition("=")
    if not name or not _:
        raise argparse.ArgumentTypeError(f"expected KNOB=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="auto")
    ap.add_argument("--only", default=None, help="run only notebooks whose name starts with this")
    ap.add_argument("--fig-dir", default=str(REPO_ROOT / "figures"))
    ap.add_argument("--out-dir", default=str(REPO_ROOT / "runs" / "notebooks"))
    ap.add_argument("--engine", default="auto", choices=["auto", "papermill", "inprocess"])
    ap.add_argument(
        "-p",
        "--param",
        action="append",
        type=_parse_knob,
        default=[],
        help="override a notebook parameter, e.g. -p SEEDS=[0,1,2] (repeatable)",
    )
    args = ap.parse_args(argv)
    from .report import resolve_preset

    nbs = sorted((REPO_ROOT / "notebooks").glob("[0-9]*.ipynb"))
    if args.only:
        nbs = [nb for nb in nbs if nb.name.startswith(args.only)]
    if not nbs:
        print("no notebooks to run" + (f" matching {args.only!r}" if args.only else " yet"))
        return 0
    fig_dir = Path(args.fig_dir) if Path(args.fig_dir).is_absolute() else REPO_ROOT / args.fig_dir
    rows = []
    for nb in nbs:
        print(f"[{len(rows) + 1}/{len(nbs)}] {nb.name} (preset {resolve_preset(args.preset)}) ...", flush=True)
        row = run_notebook(nb, args.preset, fig_dir, Path(args.out_dir), args.engine, dict(args.param))
        rows.append(row)
        status = ("ERROR " + row["error"]) if row["error"] else f"claims {row['passed']} passed, {row['failed']} failed"
        print(f"    done in {row['wall_s']:.0f} s ({row['engine']}): {status}", flush=True)
    print(f"\n{'notebook':34} {'preset':7} {'engine':10} {'wall':>8} {'passed':>7} {'failed':>7}")
    for r in rows:
        print(
            f"{r['notebook']:34} {r['preset']:7} {r['engine']:10} {r['wall_s']:7.0f}s {str(r['passed']):>7} "
            f"{str(r['failed']):>7}" + (f"  ERROR {r['error']}" if r["error"] else "")
        )
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
