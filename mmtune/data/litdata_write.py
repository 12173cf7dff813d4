"""Writes a classification source (any that `ImageClassificationData` reads) as litdata optimized chunks.

The source is read, checked and split exactly as a fit would (`ImageClassificationData.setup`: the
source's own splits, or the seeded stratified/grouped split), then each split becomes a litdata set
under `out/<split>/` (`litdata.optimize`), and `out/classes.json` records the class list, whether the
data is multi-label and each split's class counts, which `StreamingImageData` reads at setup (a streamed
set is never read whole before training).

An item is `{"image": <the encoded image file's bytes>, "label": "name" (multi-label "a|b"), "id": origin}`:
image files keep their own bytes (a JPEG stays the JPEG it was); images stored inside other files
(array rows, table cells, DICOM frames, shard members) are encoded as PNG.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Optional

from mmtune.data.samples import ImageLabel
from mmtune.errors import DataError
from mmtune.files import write_text_atomic


def encoded_image(sample: ImageLabel) -> bytes:
    """The sample's image as encoded bytes: its file's own, or PNG for an image stored inside another file."""
    if sample.image is None:
        return Path(sample.path).read_bytes()
    from mmtune.data.images import to_model_mode
    from mmtune.data.stored import stored_image

    img = stored_image(sample.image)
    if img.mode not in ("1", "L", "LA", "I;16", "P", "RGB", "RGBA"):  # PNG cannot hold float/32-bit pixels
        img = to_model_mode(img, 1 if img.mode in ("I", "F") else 3)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def to_item(sample: ImageLabel) -> dict:
    """One litdata item (a module-level function: litdata's optimize workers import it)."""
    return {"image": encoded_image(sample), "label": "|".join(sample.labels), "id": sample.origin or sample.path}


def write_litdata(splits: dict[str, list[ImageLabel]], classes: list[str], multi_label: bool, out: str,
                  chunk_bytes: str = "64MB", num_workers: int = 1) -> dict:
    """Writes each non-empty split under `out/<split>/` and `out/classes.json`; returns that file's content.

    Raises:
        DataError: `out/<split>` already holds a litdata set (never overwritten), or there is nothing to write.
    """
    import multiprocessing

    import litdata

    # litdata spawns its workers by default, and each re-imports litdata and mmtune (about 6 s a split
    # here); forked workers start at once (the parent has no threads of its own running at this point)
    start = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    root = Path(out).expanduser()
    present = {name: rows for name, rows in splits.items() if rows and name != "predict"}
    if "train" not in present:
        raise DataError("nothing to write: the source has no training images")
    for name in present:
        if (root / name / "index.json").exists():
            raise DataError(f"{root / name}: a litdata set is already there; write to a new folder")
    for name, rows in present.items():
        # reorder_files=False keeps the split's order (with one worker, item i is row i)
        litdata.optimize(fn=to_item, inputs=rows, output_dir=str(root / name), chunk_bytes=chunk_bytes,
                         num_workers=num_workers, reorder_files=False, verbose=False, start_method=start)
    listing = {"classes": list(classes), "multi_label": bool(multi_label), "splits": sorted(present),
               "counts": {name: dict(sorted(Counter(c for s in rows for c in s.labels).items()))
                          for name, rows in present.items()},
               "samples": {name: len(rows) for name, rows in present.items()}}
    write_text_atomic(root / "classes.json", json.dumps(listing, indent=2))
    return listing


def convert(source: str, out: str, chunk_bytes: str = "64MB", num_workers: int = 1,
            val_path: Optional[str] = None, test_path: Optional[str] = None, **data_args) -> dict:
    """Reads `source` as `ImageClassificationData(path=source, **data_args)` would for a fit (the same
    readers, checks and split), and writes it with `write_litdata`."""
    from mmtune.data.classification import ImageClassificationData

    data = ImageClassificationData(path=source, val_path=val_path, test_path=test_path, num_workers=0, **data_args)
    data.setup("fit")
    return write_litdata(data.splits, data.classes, data.multi_label, out, chunk_bytes, num_workers)
