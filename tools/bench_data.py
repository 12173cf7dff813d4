"""Benchmark of the image data path: setup time and peak memory of a manifest of 10k, 100k and 1M rows
(the first setup checks every header, the second reads the cache), and the training pipeline's
images/s (decode + augment + collate) by number of workers, against timm's own loader
(`timm.data.create_dataset` + `create_loader`) on the same files, in one run.

Images are hard links of a few JPEGs, so a million rows cost inodes, not disk.

    python tools/bench_data.py                 # 10k, 100k, 1M rows; workers 0, 1, 2
    python tools/bench_data.py --quick         # a smoke run (1k rows, a few batches)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mmtune, not an installed one
SOURCES = 8  # distinct image files behind the hard links
CLASSES = 4
LINKS_PER_FILE = 8 * 5_000  # rows per set of copies of the sources (5k links a file)

SETUP = r"""
import json, os, resource, sys, time
from mmtune import ImageClassificationData
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
dm = ImageClassificationData(path=sys.argv[1], num_workers=int(sys.argv[3]), header_cache=sys.argv[2])
dm.setup("fit")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_kib": peak - before,
                  "rows": sum(len(v) for v in dm.splits.values())}))
"""


def make_sources(folder: Path, size: int) -> list[Path]:
    """A few photo-like JPEGs (smooth gradients plus mild noise) of `size` pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(SOURCES):
        base = np.stack([np.sin(xx * (i + 1) * 3), np.cos(yy * (i + 2) * 2), xx * yy], axis=-1)
        arr = np.clip((base * 0.5 + 0.5) * 220 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"src{i}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        out.append(path)
    return out


def make_rows(root: Path, sources: list[Path], rows: int) -> Path:
    """`root/c<k>/<i>.jpg` hard links (a class-folder layout timm reads too) and `root/manifest.csv`."""
    manifest = root / "manifest.csv"
    if manifest.exists():
        return manifest
    for k in range(CLASSES):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    lines = ["path,label"]
    targets = sources
    for i in range(rows):
        if i and i % LINKS_PER_FILE == 0:  # a file system allows ~65k links to one inode: fresh copies
            targets = []
            for src in sources:
                copy = src.with_name(f"{src.stem}_{i}{src.suffix}")
                shutil.copyfile(src, copy)
                targets.append(copy)
        k = i % CLASSES
        os.link(targets[i % len(targets)], root / f"c{k}" / f"{i}.jpg")
        lines.append(f"c{k}/{i}.jpg,c{k}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def bench_setup(manifest: Path, cache: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", SETUP, str(manifest), str(cache), str(workers)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"setup of {manifest} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rate(loader, batches: int, batch_size: int) -> float:
    it = iter(loader)
    next(it)  # start the workers and warm the first batch
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
        n += batch_size
    return n / (time.perf_counter() - start)


def bench_pipeline(root: Path, manifest: Path, size: int, workers: int, batches: int, batch_size: int,
                   cache: Path, repeats: int = 3) -> dict:
    from timm.data import create_dataset, create_loader

    from mmtune import ImageClassificationData

    config = {"input_size": (3, size, size), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
              "interpolation": "bilinear", "crop_pct": 0.875}
    dm = ImageClassificationData(path=str(manifest), num_workers=workers, batch_size=batch_size, split=(1.0, 0.0, 0.0),
                                 header_cache=str(cache))
    dm.setup("fit")
    dm.connect(dm.classes, False, config)
    mine = dm.train_dataloader()
    dataset = create_dataset("", root=str(root), is_training=True)
    loader = create_loader(dataset, input_size=(3, size, size), batch_size=batch_size, is_training=True,
                           use_prefetcher=False, num_workers=workers, persistent_workers=workers > 0,
                           scale=(0.5, 1.0), hflip=0.5, color_jitter=None, interpolation="bilinear",
                           mean=config["mean"], std=config["std"])
    ours, theirs = [], []
    for _ in range(repeats):  # alternating, so a busy spell of a shared machine hits both sides
        ours.append(_rate(mine, batches, batch_size))
        theirs.append(_rate(loader, batches, batch_size))
    ours_m, theirs_m = statistics.median(ours), statistics.median(theirs)
    return {"workers": workers, "mmtune_images_per_s": ours_m, "timm_images_per_s": theirs_m, "ratio": ours_m / theirs_m,
            "ratios": [a / b for a, b in zip(ours, theirs)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1k rows, a few batches")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=128, help="training image size of the pipeline benchmark")
    parser.add_argument("--source_size", type=int, default=512, help="side of the JPEG files")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="alternating pipeline measurements (median)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--dir", help="where the temporary work folder goes (removed after)")
    parser.add_argument("--keep", help="a work folder to keep: a second run reuses its rows and header cache")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.workers, args.batches, args.batch_size, args.source_size = [1_000], [0, 1], 2, 8, 256

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        sources = sorted((work / "sources").glob("src?.jpg")) if (work / "sources").exists() else \
            make_sources(work / "sources", args.source_size)
        results: dict = {"setup": [], "pipeline": [], "cpus": os.cpu_count()}
        for rows in args.rows:
            manifest = make_rows(work / f"rows{rows}", sources, rows)
            cache = work / f"cache{rows}"
            cold = bench_setup(manifest, cache, 2)
            warm = bench_setup(manifest, cache, 2)
            assert cold["rows"] == warm["rows"] == rows, (cold, warm)
            results["setup"].append({"rows": rows, "first_s": cold["seconds"], "cached_s": warm["seconds"],
                                     "peak_mib": warm["peak_kib"] / 1024, "bytes_per_row": warm["peak_kib"] * 1024 / rows,
                                     "first_peak_mib": cold["peak_kib"] / 1024})
            print(f"setup {rows:>9,} rows: first {cold['seconds']:7.1f} s, cached {warm['seconds']:6.1f} s, "
                  f"peak +{warm['peak_kib'] / 1024:7.1f} MiB ({warm['peak_kib'] * 1024 / rows:4.0f} B/row; "
                  f"first run +{cold['peak_kib'] / 1024:.0f} MiB)", flush=True)
        pipeline_rows = make_rows(work / "pipeline", sources, max(args.rows[0] if args.quick else 2_000,
                                                                 args.batches * args.batch_size * 2))
        for workers in args.workers:
            r = bench_pipeline(pipeline_rows.parent, pipeline_rows, args.size, workers, args.batches, args.batch_size,
                               work / "pipeline_cache", 1 if args.quick else args.repeats)
            results["pipeline"].append(r)
            print(f"pipeline {args.size}px, {workers} worker(s): mmtune {r['mmtune_images_per_s']:6.1f} images/s, "
                  f"timm {r['timm_images_per_s']:6.1f} images/s (ratio {r['ratio']:.2f}; each: "
                  f"{', '.join(f'{x:.2f}' for x in r['ratios'])})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
