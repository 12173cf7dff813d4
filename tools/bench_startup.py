"""Start-up cost of the `mmtune` command: wall time and peak memory of each help command and of
`python -c "import mmtune"`, median of N runs, against `python -c "import lightning"` on the same machine.

    python tools/bench_startup.py            # 5 runs each, a table for docs/benchmarks.md
    python tools/bench_startup.py --quick    # 1 run each (the test suite runs this)

Peak memory is each child's own maximum resident set size (`os.wait4`), not the sum over children.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

PY = sys.executable


def commands() -> list[tuple[str, list[str]]]:
    mmtune = shutil.which("mmtune")
    cli = [mmtune] if mmtune else [PY, "-m", "mmtune"]
    return [
        ("python -c 'import lightning' (reference)", [PY, "-c", "import lightning"]),
        ("python -c 'import mmtune'", [PY, "-c", "import mmtune"]),
        ("mmtune --help", [*cli, "--help"]),
        ("mmtune data --help", [*cli, "data", "--help"]),
        ("mmtune data align --help", [*cli, "data", "align", "--help"]),
        ("mmtune export --help", [*cli, "export", "--help"]),
        ("mmtune report --help", [*cli, "report", "--help"]),
        ("mmtune fit --help", [*cli, "fit", "--help"]),
    ]


def measure(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak MiB) of one run of `argv`; raises when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run each")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    rows = []
    for name, argv in commands():
        samples = [measure(argv) for _ in range(runs)]
        rows.append((name, statistics.median(s for s, _ in samples), statistics.median(m for _, m in samples)))
    reference = rows[0][1]
    print(f"| command | wall s (median of {runs}) | x import lightning | peak MiB |")
    print("|---|---|---|---|")
    for name, seconds, mib in rows:
        print(f"| `{name}` | {seconds:.2f} | {seconds / reference:.2f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
