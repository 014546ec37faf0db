"""Compare two claims JSON files (e.g. a fresh run against the committed one).

    python scripts/compare_claims.py figures/fig2_misalignment.quick.json runs/figures/fig2_misalignment.quick.json

Prints every claim whose value or status differs, the largest relative difference, and exits 1 when a
status (PASS/FAIL/REPORT) differs or a value differs by more than --rtol (default 0: bit-identical).
"""

import argparse
import json
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rtol", type=float, default=0.0)
    args = ap.parse_args(argv)
    a, b = (json.load(open(p)) for p in (args.a, args.b))
    rows_a = {r["claim"]: r for r in a["claims"]}
    rows_b = {r["claim"]: r for r in b["claims"]}
    bad, worst = 0, 0.0
    for name in sorted(set(rows_a) | set(rows_b)):
        ra, rb = rows_a.get(name), rows_b.get(name)
        if ra is None or rb is None:
            print(f"only in {'b' if ra is None else 'a'}: {name}")
            bad += 1
            continue
        va, vb = ra["value"], rb["value"]
        rel = 0.0
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            rel = abs(va - vb) / max(abs(va), abs(vb), 1e-300) if va != vb else 0.0
            if math.isnan(rel):
                rel = math.inf
        elif va != vb:
            rel = math.inf
        worst = max(worst, rel)
        if ra["status"] != rb["status"] or rel > args.rtol:
            print(f"{ra['status']:6} -> {rb['status']:6} {name}: {va} -> {vb} (relative difference {rel:.3g})")
            bad += 1
    print(
        f"{len(rows_a)} claims compared; largest relative difference {worst:.3g}; {bad} differ beyond rtol {args.rtol}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
