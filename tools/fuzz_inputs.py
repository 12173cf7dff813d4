"""Runs the seeded fuzz cases of `tests/test_fuzz_inputs.py` and prints the outcome counts per reader
(the table in `docs/reliability.md`), then every defect with its case.

    PYTHONPATH=. python tools/fuzz_inputs.py [--all]   # --all also lists every case's outcome
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.fuzz_cases import DEFECT, judge, table  # noqa: E402
from tests.support.fuzz_readers import all_cases  # noqa: E402


def main() -> int:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, case in enumerate(all_cases()):
            folder = Path(tmp) / f"case{k}"
            folder.mkdir()
            outcomes.append((case, judge(case, folder)))
    print(table(outcomes))
    shown = outcomes if "--all" in sys.argv else [(c, o) for c, o in outcomes if o.kind == DEFECT]
    for case, outcome in shown:
        print(f"- {case.id}: {outcome.kind}: {outcome.detail}")
    return 1 if any(o.kind == DEFECT for _, o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
