#!/usr/bin/env python
"""Write a tiny, randomly initialized vision-language model and its processor with `save_pretrained`.

Why: no VLM weights can be downloaded here, yet the report-generation example should run the whole
pipeline (align, fit, test, export) offline. The builders are the ones the test suite uses
(`tests/support/tiny_vlms.py`: Qwen2-VL, LLaVA, Idefics3, PaliGemma, BLIP, ViT+GPT-2), so the example
exercises exactly the loading path a real checkpoint directory takes. Swap in a real model by
setting `model.name` to its hub id or local folder.

Usage::

    python tools/make_tiny_vlm.py --family qwen2_vl --out data/models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.tiny_vlms import FAMILIES, tiny_vlm_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    parser.add_argument("--out", type=Path, required=True, help="parent folder; the model goes to OUT/<family>")
    args = parser.parse_args()
    print(f"[make_tiny_vlm] {tiny_vlm_dir(args.family, args.out)}")


if __name__ == "__main__":
    main()
