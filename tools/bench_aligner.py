"""Benchmark of the pair aligner at scale: N image paths joined with N texts by file stem.

Writes two temp files, as a user's data would come: a manifest CSV of N image paths (about four views
per study, studies nested under patients) and a CSV of N texts (reports of about 200 characters with
an `id` column naming the image). The aligner then reads both, joins by stem, checks empty and
over-long texts, splits by patient and builds the DatasetDict; the time of writing it to disk is
reported separately.

The image paths are fake, so image decoding, hashing and the file-existence check are off by default
(the target is "without decoding images"). `--real_files` creates the N files (empty) and turns the
existence check on, to measure it too; creating them takes a while and N inodes.

    python tools/bench_aligner.py                    # 1,000,000 pairs
    python tools/bench_aligner.py --n 100000 --pii   # with PII scrubbing

Not part of the package (mmtune never imports tools/) and not a test.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets  # noqa: E402

from mmtune.data.align import AlignSpec, PIISpec, align_pairs, format_summary, save_aligned  # noqa: E402

FINDINGS = ["No acute cardiopulmonary abnormality.", "Heart size is normal.", "Lungs are clear.",
            "A 3.5 cm nodule in the right upper lobe.", "Mild degenerative change of the spine.",
            "Small left pleural effusion.", "T2 hyperintense lesion, 12 x 8 mm.", "No pneumothorax.",
            "Stable appearance compared with the prior study.", "Bibasilar atelectasis."]


def synthesize(root: Path, n: int, seed: int = 0, real_files: bool = False) -> tuple[Path, Path]:
    """Writes `images.csv` (path) and `reports.csv` (id, text, patient) with `n` rows each."""
    rng = random.Random(seed)
    images, reports = root / "images.csv", root / "reports.csv"
    with images.open("w", newline="") as fi, reports.open("w", newline="") as ft:
        wi, wt = csv.writer(fi), csv.writer(ft)
        wi.writerow(["path"])
        wt.writerow(["id", "text", "patient"])
        for i in range(n):
            patient, study = i // 20, i // 4
            name = f"img{i:07d}"
            rel = f"p{patient // 1000:04d}/p{patient:06d}/s{study:07d}/{name}.png"
            wi.writerow([rel])
            text = " ".join(rng.sample(FINDINGS, rng.randint(2, 6)))
            if i % 50 == 0:  # some personal data for --pii to find
                text += f" Compared with the study of 03/04/2021. MRN: {1000000 + i}."
            wt.writerow([name, "" if i % 997 == 0 else text, f"p{patient:06d}"])
            if real_files:
                path = root / rel
                if i % 4 == 0:
                    path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    return images, reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="image paths and texts (one text per image)")
    parser.add_argument("--pii", action="store_true", help="also scrub PII (emails, phones, dates, ids)")
    parser.add_argument("--real_files", action="store_true", help="create the files and check that they exist")
    parser.add_argument("--no_save", action="store_true", help="skip save_to_disk")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        images, reports = synthesize(root, args.n, real_files=args.real_files)
        t1 = time.perf_counter()
        print(f"synthesized {args.n:,} paths and texts in {t1 - t0:.1f} s "
              f"({images.stat().st_size / 1e6:.0f} MB + {reports.stat().st_size / 1e6:.0f} MB of CSV)")
        spec = AlignSpec(images=str(images), texts=str(reports), key="stem", key_column="id", group_column="patient",
                         check_files=args.real_files, check_images=False, check_duplicates=False, max_chars=2000,
                         pii=PIISpec(enabled=args.pii))
        t1 = time.perf_counter()
        dataset, report = align_pairs(spec)
        t2 = time.perf_counter()
        print(format_summary(report))
        rows = report["rows"]
        print(f"align_pairs: {t2 - t1:.1f} s wall, {rows / (t2 - t1):,.0f} rows/s "
              f"({args.n:,} paths x {args.n:,} texts, cpu count {os.cpu_count()})")
        if not args.no_save:
            save_aligned(dataset, report, str(root / "out"))
            t3 = time.perf_counter()
            print(f"save_to_disk + report: {t3 - t2:.1f} s; total {t3 - t1:.1f} s wall, {rows / (t3 - t1):,.0f} rows/s")


if __name__ == "__main__":
    main()
