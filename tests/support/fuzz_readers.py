"""Every data reader called the way its data module calls it, for the fuzz cases of `fuzz_cases`: each
`run_*` reads one file under a bad-row policy and returns (rows used, {skipped row: reason})."""

from __future__ import annotations

import functools
import random
from pathlib import Path

from tests.support.fuzz_cases import (BAD_IMAGES, GOOD_IMAGES, READ, SEED, Case, Schema, Trial, image_cases,
                                      place_image, table_cases, write_jsonl)


@functools.lru_cache(maxsize=1)
def tokenizer():
    from tests.support.text import LLAMA_TEMPLATE, build_tokenizer

    return build_tokenizer(LLAMA_TEMPLATE, bos="<s>", eos="</s>")


def _token_skips(stats: dict) -> dict[str, str]:
    """SFT and DPO drop rows at tokenization and count them per split and reason in `data_stats.json`."""
    return {f"{split} {reason} {k}": reason for split, st in stats.items() for reason in ("dropped", "no_target")
            for k in range(st[reason])}


def run_classification(path: Path, policy: str, **kwargs) -> tuple[int, dict[str, str]]:
    from mmtune.data.classification import ImageClassificationData

    dm = ImageClassificationData(path=str(path), split=(1.0, 0.0, 0.0), bad_images=policy, num_workers=0, **kwargs)
    dm.setup("fit")
    return sum(len(rows) for rows in dm.splits.values()), dict(dm.skipped)


def run_text(path: Path, policy: str) -> tuple[int, dict[str, str]]:
    from mmtune.data.text import TextData

    dm = TextData(path=str(path), split=(1.0, 0.0, 0.0), max_length=48, overlong="drop" if policy == "skip" else "truncate")
    dm.setup("fit")
    dm.connect(tokenizer())
    return sum(len(rows) for rows in dm.tokenized.values()), _token_skips(dm.stats)


def run_preference(path: Path, policy: str) -> tuple[int, dict[str, str]]:
    from mmtune.data.preference import PreferenceData

    dm = PreferenceData(path=str(path), split=(1.0, 0.0, 0.0), max_length=48, overlong="drop" if policy == "skip" else "truncate")
    dm.setup("fit")
    dm.connect(tokenizer())
    return sum(len(rows) for rows in dm.tokenized.values()), _token_skips(dm.stats)


def run_prompts(path: Path, policy: str) -> tuple[int, dict[str, str]]:
    from mmtune.data.text_reading import read_prompts

    return len(read_prompts(str(path))), {}


def run_vlm(path: Path, policy: str) -> tuple[int, dict[str, str]]:
    from mmtune.data.vl_data import VisionTextData

    dm = VisionTextData(path=str(path), split=(1.0, 0.0, 0.0), bad_samples=policy, num_workers=0)
    dm.setup()
    return sum(len(rows) for rows in dm.samples.values()), dict(dm.skipped)


def run_pairs(path: Path, policy: str) -> tuple[int, dict[str, str]]:
    from mmtune.data.pairs import ImageTextPairData

    dm = ImageTextPairData(path=str(path), split=(1.0, 0.0, 0.0), group_column="group", label_column="label",
                           bad_pairs=policy, num_workers=0)
    dm.setup()
    return sum(len(rows) for rows in dm.splits.values()), dict(dm.skipped)


def run_query_docs(path: Path, policy: str) -> tuple[int, dict[str, str]]:
    from mmtune.data.text_pairs import QueryDocData

    dm = QueryDocData(path=str(path), split=(1.0, 0.0, 0.0), group_column="group", bad_pairs=policy)
    dm.setup()
    return sum(len(rows) for rows in dm.splits.values()), dict(dm.skipped)


def run_align(texts: Path, policy: str, images: Path | None = None) -> tuple[int, dict[str, str]]:
    """Texts in = texts in the output + unmatched texts + texts dropped (per reason); and images in =
    matched images + unmatched images (checked here: a broken image tally is a defect too)."""
    from mmtune.data.align.pipeline import align_pairs
    from mmtune.data.align.spec import AlignSpec, ProblemPolicy

    spec = AlignSpec(images=str(images or texts.parent / "img"), texts=str(texts), workers=2,
                     policy=ProblemPolicy(default="drop" if policy == "skip" else "error"))
    dataset, report = align_pairs(spec)
    used = {row_id.split("|", 1)[0] for split in dataset.values() for row_id in split["id"]}
    skipped = {f"unmatched {k}": "unmatched text" for k in range(report["unmatched_texts"]["count"])}
    for reason, entry in report["dropped"].items():
        if entry["unit"] == "text":
            skipped.update({f"{reason} {k}": reason for k in range(entry["count"])})
    images_in = report["matched"]["images"] + report["unmatched_images"]["count"]
    if images_in != report["images"]:
        raise AssertionError(f"images lost: {report['images']} read, {images_in} matched or unmatched")
    return len(used), skipped


SCHEMAS = [
    Schema("classification", lambda i, im: {"path": im, "label": "ab"[i % 2], "split": "train", "group": f"g{i}"},
           {"path": "path", "label": "label", "split": "split", "group": "group"},
           lambda p, pol: run_classification(p, pol, group_column="group"), images=True),
    Schema("sft text", lambda i, im: {"instruction": f"Repeat word {i}.", "input": "apple", "output": "apple apple apple"},
           {"instruction": "text", "input": "optional_text", "output": "text"}, run_text),
    Schema("sft prompts", lambda i, im: {"prompt": f"Say hello {i}."}, {"prompt": "text"}, run_prompts),
    Schema("dpo preference", lambda i, im: {"prompt": f"Pick a fruit {i}.", "chosen": "apple", "rejected": "dog"},
           {"prompt": "text", "chosen": "text", "rejected": "text"}, run_preference),
    Schema("vlm", lambda i, im: {"id": f"s{i}", "image": im, "question": "<image> Is it red?", "answer": "yes"},
           {"id": "id", "image": "path", "question": "text", "answer": "label"}, run_vlm, images=True),
    Schema("image-text pairs", lambda i, im: {"image": im, "text": f"a photo {i}", "group": f"g{i}", "label": "ab"[i % 2]},
           {"image": "path", "text": "text", "group": "group", "label": "label"}, run_pairs, images=True),
    Schema("query-document pairs", lambda i, im: {"query": f"query {i}", "positive": f"document {i}", "group": f"d{i}"},
           {"query": "text", "positive": "text", "group": "group"}, run_query_docs),
    Schema("align", lambda i, im: {"id": Path(im).stem, "text": f"report {i}"}, {"id": "id", "text": "text"},
           run_align, images=True),
]


# ---- one bad image among good ones -----------------------------------------------------------------
def _manifest_with(folder: Path, kind: str, rng: random.Random, row, n: int = 5, bad_twice: bool = False):
    """`n` rows naming good images, one of which is `kind` (named by two rows with `bad_twice`)."""
    bad = rng.randrange(n)
    rows, names = [], []
    for i in range(n):
        image = place_image(folder / "img", f"im{i}", kind if i == bad else "good", rng)
        names.append(image.name)
        rows.append(row(i, image.relative_to(folder).as_posix()))
    if bad_twice:
        rows.append(row(n, rows[bad]["path" if "path" in rows[bad] else "image"]) | {"label": "ab"[n % 2]})
    return rows, names[bad]


def _image_trial(schema: Schema, bad_twice: bool = False):
    def build(folder: Path, kind: str, rng: random.Random, policy: str) -> Trial:
        rows, bad = _manifest_with(folder, kind, rng, schema.row, bad_twice=bad_twice)
        if schema.reader == "vlm" and bad_twice:
            rows[-1].pop("label")
            rows[-1]["id"] = rows[-2]["id"]  # the same id twice: a sample that repeats an id
        manifest = write_jsonl(folder / "data.jsonl", rows)
        return Trial(lambda: schema.run(manifest, policy), len(rows), (manifest.name, bad))
    return build


def _folder_trial(reader: str):
    def build(folder: Path, kind: str, rng: random.Random, policy: str) -> Trial:
        root = folder / "images"
        bad = rng.randrange(5)
        names = [place_image(root / "ab"[i % 2], f"im{i}", kind if i == bad else "good", rng).name for i in range(5)]
        if reader == "classification folder":
            return Trial(lambda: run_classification(root, policy), 5, (root.name, names[bad]))
        texts = write_jsonl(folder / "texts.jsonl", [{"id": f"im{i}", "text": f"report {i}"} for i in range(5)])
        return Trial(lambda: run_align(texts, policy, images=root), 5, (texts.name, names[bad]))
    return build


def _folder_loop(reader: str):
    """A class folder holding a symlink to its parent: a tree walk that follows it never ends."""
    def make(folder: Path) -> Trial:
        trial = _folder_trial(reader)(folder, "good", random.Random(1), "error")
        (folder / "images" / "a" / "loop").symlink_to("..", target_is_directory=True)
        trial.allowed = frozenset({READ})
        return trial
    return Case(reader, "a folder symlink loop inside the tree", make)


def all_cases() -> list[Case]:
    """Every case, in a fixed order from one seed."""
    rng = random.Random(SEED)
    cases: list[Case] = []
    for schema in SCHEMAS:
        cases += table_cases(schema, rng)
    for schema in SCHEMAS:
        if schema.images and schema.reader != "align":
            cases += image_cases(schema.reader, _image_trial(schema), rng,
                                 missing_is_error=schema.reader == "classification")
    folder_kinds = [k for k in (*GOOD_IMAGES, *BAD_IMAGES) if k != "folder named .png"]
    for reader in ("classification folder", "align"):
        cases += image_cases(reader, _folder_trial(reader), rng, folder_kinds)
        cases.append(_folder_loop(reader))
    for schema in SCHEMAS:
        if schema.reader in ("classification", "vlm", "image-text pairs"):
            cases += image_cases(schema.reader, _image_trial(schema, bad_twice=True), rng,
                                 ["truncated png", "decompression bomb past the pixel limit", "symlink loop"],
                                 "two rows name one ", missing_is_error=schema.reader == "classification")
    return cases


__all__ = ["all_cases", "SCHEMAS"]
