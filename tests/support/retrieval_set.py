"""An offline retrieval set whose queries use made-up jargon for materials: an untuned encoder cannot
tell which material a query means, a tuned one learns the words from the training queries."""

from __future__ import annotations

import csv
import random
from pathlib import Path

MATERIALS = {"steel": "zorblat", "wood": "quindle", "glass": "vexmor", "copper": "plinth", "plastic": "drabex",
             "stone": "murvik"}
THINGS = ("chair", "table", "lamp", "bottle", "knife", "bucket", "shelf", "bowl")
COLORS = ("red", "green", "blue", "black")


def make_retrieval_set(path: Path, seed: int = 0) -> Path:
    """One row per (material, thing, color) document: query `<color> <thing> in <jargon>`, positive
    `A <color> <thing> made of <material>.`, hard negative: the same thing and color, another material.
    The group is the document, so held-out queries ask for documents never trained on."""
    rng = random.Random(seed)
    rows = []
    for material, word in MATERIALS.items():
        for thing in THINGS:
            for color in COLORS:
                other = rng.choice([m for m in MATERIALS if m != material])
                rows.append({"query": f"{color} {thing} in {word}", "positive": f"A {color} {thing} made of {material}.",
                             "negative": f"A {color} {thing} made of {other}.", "group": f"{material}-{thing}-{color}"})
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
