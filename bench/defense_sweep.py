"""A defense sweep (scenarios/defense-sweep-mnist.yaml by default): every variant's attacks,
utility, bytes sent and epsilon. Prints JSON; the sweep's folder keeps each variant's report,
and a re-run reuses the finished variants.

    OMP_NUM_THREADS=1 python bench/defense_sweep.py --data-dir ../shared/datasets --out sweep-out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import machine

from gradaudit.audit.sweep import load_sweep, markdown_table, run_sweep

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sweep", type=Path, default=REPO / "scenarios" / "defense-sweep-mnist.yaml"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("sweep-defense-sweep-mnist"))
    parser.add_argument("--markdown", action="store_true", help="also print the table")
    args = parser.parse_args()
    sets = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    name, variants = load_sweep(args.sweep, sets)
    summary = run_sweep(name, variants, args.out)
    print(json.dumps({"machine": machine(), **summary}, indent=1))
    if args.markdown:
        print(markdown_table(summary))


if __name__ == "__main__":
    main()
