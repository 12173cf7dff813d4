#!/usr/bin/env python
"""Generate a small, seeded synthetic data set of surface-defect photos for the offline demo.

Why: the mmtune demo must run with no internet, so it cannot download a real
inspection data set. This script draws plausible "surface photos" instead:
a textured background (brushed metal, grain or mottled finish, with random tint,
brightness and a slight lighting gradient) and, for defect classes, one visible but
not trivial defect:

* ``clean``   - background only
* ``scratch`` - one or two thin, long, straight bright or dark lines at a random angle
* ``spot``    - one to three soft blobs / stains (dark, bright or rust-tinted)
* ``crack``   - a dark, jagged, branching polyline

Position, size and contrast vary per image, and brushed textures contain line-like
streaks, so a small CNN needs a few epochs to tell the classes apart but can reach
high accuracy. Every image belongs to one production lot (``group`` column); images of
a lot share background settings (finish, tint, brightness), so a group-aware split is
measurably more honest than a random one. Even lots ran on production line A, odd lots on
line B (``line`` column): a subgroup to audit the model on.

Output::

    DIR/images/<class>/<class>_<i>.png
    DIR/manifest.csv     (header: path,label,group,line; path relative to the manifest)

The output is byte-for-byte deterministic for a given seed (each image has its own
seeded generator, independent of generation order).

Usage::

    python tools/make_defect_data.py --out DIR [--per-class 100] [--size 64] [--seed 0] [--lots 20]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("clean", "scratch", "spot", "crack")
TEXTURES = ("brushed", "grain", "mottled")
SUPERSAMPLE = 2  # defects are drawn at 2x and box-downsampled for anti-aliasing

_LOT_STREAM = 1_000_003  # distinct seed-sequence tags for lots and images
_IMG_STREAM = 2_000_003
_FINISH_TAG = 2**31  # sub-streams of the lot stream (lot indices are < 2**31)
_ASSIGN_TAG = 2**31 + 1


def lot_name(index: int, lots: int) -> str:
    """Return the production-lot id, e.g. ``lot07`` (zero padded to at least 2 digits)."""
    width = max(2, len(str(lots - 1)))
    return f"lot{index:0{width}d}"


def make_lot_params(seed: int, lots: int) -> list:
    """Draw per-lot background settings (finish, tint, brightness) shared by all images of a lot."""
    params = []
    offset = int(np.random.default_rng([seed, _LOT_STREAM, _FINISH_TAG]).integers(len(TEXTURES)))
    for k in range(lots):
        rng = np.random.default_rng([seed, _LOT_STREAM, k])
        params.append({
            "texture": TEXTURES[(k + offset) % len(TEXTURES)],  # balanced finishes across lots
            "brightness": float(rng.uniform(0.35, 0.7)),
            "tint": rng.uniform(-0.08, 0.08, size=3),
            "texture_strength": float(rng.uniform(0.5, 1.3)),
        })
    return params


def assign_lots(seed: int, per_class: int, lots: int) -> np.ndarray:
    """Assign each (class, index) to a lot: balanced round-robin per class, then shuffled."""
    rng = np.random.default_rng([seed, _LOT_STREAM, _ASSIGN_TAG])
    table = np.empty((len(CLASSES), per_class), dtype=np.int64)
    for c in range(len(CLASSES)):
        table[c] = rng.permutation(np.arange(per_class) % lots)
    return table


def _low_freq_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in roughly [-1, 1]: a small random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def make_background(rng: np.random.Generator, size: int, lot: dict) -> np.ndarray:
    """Return an HxWx3 float image in [0, 1]: lot texture + tint + brightness + lighting gradient."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    strength = lot["texture_strength"] * rng.uniform(0.7, 1.3)
    kind = lot["texture"]
    if kind == "brushed":
        theta = rng.uniform(0, math.pi) if rng.random() < 0.5 else rng.normal(0, 0.15)
        proj = (xx * math.cos(theta) + yy * math.sin(theta)) * (size - 1)
        n = 2 * size + 4
        streaks = rng.normal(0, 1, size=n).astype(np.float32)
        streaks = np.convolve(streaks, np.ones(2, np.float32) / 2, mode="same")
        idx = np.clip((proj + size + 1).astype(np.int64), 0, n - 1)
        tex = 0.055 * streaks[idx] * (1 + 0.5 * _low_freq_noise(rng, size, 4))
        tex += 0.015 * rng.normal(0, 1, size=(size, size)).astype(np.float32)
    elif kind == "grain":
        tex = 0.05 * rng.normal(0, 1, size=(size, size)).astype(np.float32)
        tex += 0.03 * _low_freq_noise(rng, size, 8)
    else:  # mottled
        tex = 0.06 * _low_freq_noise(rng, size, int(rng.integers(5, 10)))
        tex += 0.02 * rng.normal(0, 1, size=(size, size)).astype(np.float32)
    tex *= strength

    g_angle = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(0.0, 0.15) * ((xx - 0.5) * math.cos(g_angle) + (yy - 0.5) * math.sin(g_angle))
    base = lot["brightness"] + rng.normal(0, 0.04)
    gray = base + gradient + tex
    tint = 1.0 + lot["tint"] + rng.normal(0, 0.015, size=3)
    return gray[..., None] * tint[None, None, :].astype(np.float32)


def _mask_canvas(size: int):
    """Return a blank supersampled 'L' canvas and its drawer."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    return canvas, ImageDraw.Draw(canvas)


def _finish_mask(canvas: Image.Image, size: int, blur: float = 0.0) -> np.ndarray:
    """Optionally blur, box-downsample to ``size`` and return a float mask in [0, 1]."""
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur * SUPERSAMPLE))
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def draw_scratch(rng: np.random.Generator, size: int) -> tuple:
    """One or two thin straight lines at a random angle; returns (mask, signed contrast)."""
    canvas, draw = _mask_canvas(size)
    s = SUPERSAMPLE
    n_lines = 1 if rng.random() < 0.7 else 2
    theta = rng.uniform(0, math.pi)
    for _ in range(n_lines):
        t = theta + rng.normal(0, 0.08)
        length = rng.uniform(0.4, 0.85) * size
        cx, cy = rng.uniform(0.25, 0.75, size=2) * size
        dx, dy = 0.5 * length * math.cos(t), 0.5 * length * math.sin(t)
        width = int(rng.integers(2, 4))  # 1 - 1.5 px at output resolution
        draw.line([((cx - dx) * s, (cy - dy) * s), ((cx + dx) * s, (cy + dy) * s)], fill=255, width=width)
    mask = _finish_mask(canvas, size)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return mask, sign * rng.uniform(0.25, 0.5)


def draw_spot(rng: np.random.Generator, size: int) -> tuple:
    """One to three soft elliptical blobs; returns (mask, signed contrast)."""
    canvas, draw = _mask_canvas(size)
    s = SUPERSAMPLE
    n_spots = int(rng.choice([1, 1, 2, 3]))
    for _ in range(n_spots):
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        rx = rng.uniform(0.045, 0.11) * size
        ry = rx * rng.uniform(0.6, 1.4)
        draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s],
                     fill=int(rng.integers(170, 256)))
    mask = _finish_mask(canvas, size, blur=rng.uniform(0.4, 1.2))
    sign = -1.0 if rng.random() < 0.75 else 1.0
    return mask, sign * rng.uniform(0.2, 0.4)


def draw_crack(rng: np.random.Generator, size: int) -> tuple:
    """A dark jagged random-walk polyline with one or two branches; returns (mask, contrast)."""
    canvas, draw = _mask_canvas(size)
    s = SUPERSAMPLE

    def walk(x, y, heading, steps, step_len):
        pts = [(x, y)]
        for _ in range(steps):
            heading += rng.normal(0, 0.25)  # slow drift of the overall direction
            zig = heading + rng.normal(0, 0.7)  # jagged zig-zag around it
            x += step_len * rng.uniform(0.6, 1.4) * math.cos(zig)
            y += step_len * rng.uniform(0.6, 1.4) * math.sin(zig)
            if not (lo <= x <= hi and lo <= y <= hi):  # keep the crack on the part
                x, y = min(max(x, lo), hi), min(max(y, lo), hi)
                heading += math.pi * rng.uniform(0.6, 1.0)
            pts.append((x, y))
        return pts

    lo, hi = 0.06 * size, 0.94 * size
    x0, y0 = rng.uniform(0.25, 0.75, size=2) * size
    heading = rng.uniform(0, 2 * math.pi)
    step_len = size / rng.uniform(12, 18)
    main = walk(x0, y0, heading, int(rng.integers(6, 11)), step_len)
    paths = [main]
    for _ in range(int(rng.integers(1, 3))):
        j = int(rng.integers(1, len(main) - 1))
        bx, by = main[j]
        paths.append(walk(bx, by, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.3),
                          int(rng.integers(2, 6)), step_len * 0.8))
    for k, pts in enumerate(paths):
        width = int(rng.integers(2, 4)) if k == 0 else 2
        draw.line([(px * s, py * s) for px, py in pts], fill=255, width=width)
    mask = _finish_mask(canvas, size)
    return mask, -rng.uniform(0.25, 0.5)


_DEFECT_DRAWERS = {"scratch": draw_scratch, "spot": draw_spot, "crack": draw_crack}


def render_image(label: str, size: int, rng: np.random.Generator, lot: dict) -> Image.Image:
    """Render one RGB surface image of class ``label``."""
    img = make_background(rng, size, lot)
    if label != "clean":
        mask, contrast = _DEFECT_DRAWERS[label](rng, size)
        if label == "spot" and rng.random() < 0.35:  # rust-coloured stain
            color = np.array([0.9, 0.55, 0.25], np.float32) * abs(contrast) * 1.5
            img = img * (1 - 0.5 * mask[..., None]) + mask[..., None] * color * 0.5
        else:
            img = img + contrast * mask[..., None]
    img = img + rng.normal(0, 0.01, size=img.shape).astype(np.float32)  # sensor noise
    return Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def make_defect_dataset(out_dir, per_class: int = 100, size: int = 64, seed: int = 0, lots: int = 20) -> Path:
    """Write the data set to ``out_dir`` and return the path of ``manifest.csv``."""
    if per_class < 1 or size < 16 or lots < 1 or seed < 0:
        raise ValueError("need per_class >= 1, size >= 16, lots >= 1, seed >= 0")
    out_dir = Path(out_dir)
    lot_params = make_lot_params(seed, lots)
    lot_table = assign_lots(seed, per_class, lots)
    rows = []
    for c, label in enumerate(CLASSES):
        class_dir = out_dir / "images" / label
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            lot_idx = int(lot_table[c, i])
            rng = np.random.default_rng([seed, _IMG_STREAM, c, i])
            img = render_image(label, size, rng, lot_params[lot_idx])
            rel = f"images/{label}/{label}_{i}.png"
            img.save(out_dir / rel, format="PNG", optimize=False, compress_level=6)
            rows.append((rel, label, lot_name(lot_idx, lots), "AB"[lot_idx % 2]))
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("path", "label", "group", "line"))
        writer.writerows(rows)
    return manifest


def main(argv=None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--lots", type=int, default=20, help="number of production lots / groups (default 20)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    manifest = make_defect_dataset(args.out, args.per_class, args.size, args.seed, args.lots)
    n = args.per_class * len(CLASSES)
    print(f"wrote {n} images ({len(CLASSES)} classes x {args.per_class}, {args.size}x{args.size}, "
          f"{args.lots} lots, seed {args.seed}) -> {manifest} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
