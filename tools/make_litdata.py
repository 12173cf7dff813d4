#!/usr/bin/env python
"""Turn an image folder, manifest, or any classification source mmtune reads into litdata optimized chunks.

Why: data larger than the local disk, or kept in object storage, is trained by streaming
(`StreamingImageData`), which reads litdata's chunked format. This tool writes it from what users have:
the source is read, checked and split as a fit would read it (the same readers, the seeded stratified or
grouped split), then `OUT/train/`, `OUT/val/`, `OUT/test/` (each an `index.json` and `chunk-*.bin`) and
`OUT/classes.json` (class list, multi-label, class counts per split) are written. Copy OUT to object
storage as it is (`aws s3 sync OUT s3://bucket/defects-optimized/`) and set `data.init_args.root` to it.

Usage::

    python tools/make_litdata.py --source data/defects/manifest.csv --out data/defects-optimized \
        [--group-column group] [--split 0.7 0.15 0.15] [--seed 42] [--chunk-bytes 64MB] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="image folder, manifest, .npz, datasets folder, shards")
    parser.add_argument("--out", required=True, help="output folder (train/, val/, test/, classes.json)")
    parser.add_argument("--val-path", help="a separate validation source")
    parser.add_argument("--test-path", help="a separate test source")
    parser.add_argument("--group-column", help="manifest column whose groups never cross splits")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--path-column", default="path")
    parser.add_argument("--class-names", nargs="+", help="names of integer labels (index -> name)")
    parser.add_argument("--split", nargs=3, type=float, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--no-stratify", action="store_true", help="split regardless of label")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--chunk-bytes", default="64MB", help="chunk size (litdata streams whole chunks)")
    parser.add_argument("--workers", type=int, default=1, help="litdata.optimize worker processes")
    args = parser.parse_args(argv)

    from mmtune.data.litdata_write import convert
    from mmtune.errors import MMTuneError

    try:
        listing = convert(args.source, args.out, args.chunk_bytes, args.workers, args.val_path, args.test_path,
                          group_column=args.group_column, label_column=args.label_column,
                          path_column=args.path_column, class_names=args.class_names, split=tuple(args.split),
                          stratify=not args.no_stratify, seed=args.seed)
    except MMTuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(Path(args.out).resolve()), "samples": listing["samples"],
                      "classes": listing["classes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
