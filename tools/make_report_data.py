#!/usr/bin/env python
"""Generate a small, seeded synthetic set of chest-radiograph-like studies with free-text reports.

Why: the report-generation example must run offline, so it cannot download MIMIC-CXR or IU X-ray.
Each study has a frontal and a lateral 16-bit grayscale view (as DICOM exports often are) and one
report in a `.txt` file, written by a radiologist-like template from the findings drawn into the
images: an opacity (left or right), a pleural effusion (blunted base), an enlarged heart, or none.
Reports carry a header with a patient name, MRN, phone number and study date, as real exports do,
so the aligner's PII scrubbing has something to remove. A few defects mimic real dumps: one
corrupt image file, one study without a report, one report without images.

Output::

    DIR/images/<patient>_<study>_<view>.png
    DIR/reports.csv    (study,patient,report), as a report export from the hospital system

Usage::

    python tools/make_report_data.py --out data/reports --studies 60
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import numpy as np
from PIL import Image

FIRST = ("Anna", "John", "Maria", "Peter", "Lena", "Omar", "Sofia", "Tom")
LAST = ("Smith", "Garcia", "Novak", "Khan", "Berg", "Rossi", "Meyer", "Lee")


def _base(rng: np.random.Generator, size: int, lateral: bool) -> np.ndarray:
    """Dark background, two bright-ish lung fields (one for the lateral view), a mediastinum."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.15 + 0.05 * rng.standard_normal((size, size))
    if lateral:
        img += 0.35 * (((xx - 0.5) / 0.3) ** 2 + ((yy - 0.5) / 0.38) ** 2 < 1)
    else:
        for cx in (0.3, 0.7):
            img += 0.35 * (((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.34) ** 2 < 1)
    return img


def draw_view(findings: dict, rng: np.random.Generator, size: int, lateral: bool) -> Image.Image:
    img = _base(rng, size, lateral)
    yy, xx = np.mgrid[0:size, 0:size] / size
    heart = 0.16 if findings["cardiomegaly"] else 0.1
    img += 0.25 * (((xx - 0.5) / heart) ** 2 + ((yy - 0.62) / heart) ** 2 < 1)
    if findings["opacity"]:
        cx = 0.3 if findings["opacity"] == "right" else 0.7  # the patient's right is the image's left
        cx = 0.5 if lateral else cx
        img += 0.4 * (((xx - cx) / 0.08) ** 2 + ((yy - 0.45) / 0.08) ** 2 < 1)
    if findings["effusion"]:
        img += 0.3 * (yy > 0.78)
    arr = np.clip(img, 0, 1) * 4095  # 12-bit data in a 16-bit PNG, like many exports
    return Image.fromarray(arr.astype(np.uint16))


def report(findings: dict, patient: str, mrn: str, phone: str, date: str) -> str:
    lines = [f"Patient: {patient}   MRN: {mrn}   Phone: {phone}", f"Study date: {date}", "",
             "FINDINGS:"]
    if findings["opacity"]:
        lines.append(f"There is a focal opacity in the {findings['opacity']} mid lung zone.")
    else:
        lines.append("The lungs are clear.")
    lines.append("Small pleural effusion at the base." if findings["effusion"] else "No pleural effusion.")
    lines.append("The heart is enlarged." if findings["cardiomegaly"] else "Heart size is normal.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(args.studies):
        study, patient = f"S{s:04d}", f"P{rng.randrange(args.patients):03d}"
        findings = {"opacity": rng.choice([None, None, "left", "right"]), "effusion": rng.random() < 0.3,
                    "cardiomegaly": rng.random() < 0.25}
        pixels = np.random.default_rng([args.seed, s])
        for view in ("frontal", "lateral"):
            draw_view(findings, pixels, args.size, view == "lateral").save(
                args.out / "images" / f"{patient}_{study}_{view}.png")
        if s == 1:
            continue  # a study whose report is missing from the export
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        text = report(findings, name, str(rng.randrange(10**6, 10**7)), f"+1 555-{rng.randrange(100, 999)}-"
                      f"{rng.randrange(1000, 9999)}", f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}")
        rows.append((study, patient, text))
    rows.append(("S9999", "P999", "FINDINGS:\nThe lungs are clear.\n"))  # a report whose images are missing
    corrupt = sorted((args.out / "images").glob("*_S0002_lateral.png"))[0]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated export")
    with (args.out / "reports.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("study", "patient", "report"), *rows])
    print(f"[make_report_data] {args.studies} studies of {args.patients} patients -> {args.out}")


if __name__ == "__main__":
    main()
