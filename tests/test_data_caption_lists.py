"""The aligner on a real captions table (one row per image, a list of captions): one pair per caption
with its index, or a refusal saying how; no value made into text silently; query-document pairs built
from the captions of one image train a text embedding model."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
from PIL import Image

from mmtune.data.align import AlignSpec, align_pairs, save_aligned
from mmtune.errors import DataError

SHAPES = ("square", "circle", "star", "heart", "moon", "cross", "ring", "arrow")


def _captions(tmp_path, suffix=".jsonl", n=8):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (8, 8), (30 * i, 10, 10)).save(tmp_path / "imgs" / f"im{i}.png")
        shape = SHAPES[i % len(SHAPES)]
        rows.append({"id": f"im{i}", "captions": [f"a {shape}", f"one {shape} shape", f"the {shape} drawn",
                                                  f"picture of a {shape}", f"{shape} on white"]})
    path = tmp_path / f"captions{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # a CSV exported from a DataFrame: each list written as its Python repr
        path.write_text("id,captions\n" + "".join(f'{r["id"]},"{r["captions"]!r}"\n' for r in rows))
    return path


def _spec(tmp_path, texts, **kwargs):
    return AlignSpec(images=str(tmp_path / "imgs"), texts=str(texts), text_column="captions",
                     check_duplicates=False, **kwargs)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_list_of_captions_is_refused_with_a_how_to_or_becomes_one_pair_each(tmp_path, suffix):
    texts = _captions(tmp_path, suffix)
    with pytest.raises(DataError, match=r"row 2|line 1") as err:
        align_pairs(_spec(tmp_path, texts))
    assert "holds a list of 5 texts; set text_lists: explode" in str(err.value)
    dataset, report = align_pairs(_spec(tmp_path, texts, text_lists="explode"))
    rows = [r for split in dataset.values() for r in split.to_list()]
    assert report["rows"] == len(rows) == 40
    assert Counter(r["text_index"] for r in rows) == {i: 8 for i in range(5)}
    assert not any(r["text"].startswith("[") for r in rows)  # never the list's repr as one text
    split_of = {}
    for name, split in dataset.items():
        for r in split.to_list():
            assert split_of.setdefault(r["group"], name) == name  # an image's captions share a split
    assert len({r["id"] for r in rows}) == 40


def test_a_number_in_a_text_column_is_never_made_into_text(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"id": "a", "captions": 42}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl line 1: field 'captions' must be text, got a int"):
        align_pairs(_spec(tmp_path, texts))
    texts.write_text(json.dumps({"id": "a", "captions": ["fine", 7]}) + "\n")
    with pytest.raises(DataError, match="a list holding a int"):
        align_pairs(_spec(tmp_path, texts, text_lists="explode"))


def test_pairs_from_groups_are_seeded_and_never_a_text_with_itself():
    from mmtune.data.text_groups import pairs_from_groups

    groups = ["a"] * 5 + ["b"] * 3 + ["c"] + [None]
    pairs, alone = pairs_from_groups([str(i) for i in range(10)], groups, seed=1)
    assert pairs == pairs_from_groups([str(i) for i in range(10)], groups, seed=1)[0]
    assert pairs != pairs_from_groups([str(i) for i in range(10)], groups, seed=2)[0]
    assert alone == [8, 9] and sorted(q for q, _ in pairs) == list(range(8))
    assert sorted(d for _, d in pairs) == list(range(8))  # each text is a positive once too
    assert all(q != d and groups[q] == groups[d] for q, d in pairs)


def test_an_aligned_captions_set_trains_a_text_embedding_model(tmp_path):
    import lightning as L

    from mmtune import ImageTextAlignmentTask, ModelSpec, MonitorSpec, QueryDocData
    from support.tiny_align import save_tiny_sentence_encoder

    dataset, report = align_pairs(_spec(tmp_path, _captions(tmp_path), text_lists="explode", split=(0.5, 0.25, 0.25)))
    save_aligned(dataset, report, str(tmp_path / "aligned"))
    data = QueryDocData(path=str(tmp_path / "aligned"), positive_from="group", query_column="text",
                        group_column="group", batch_size=8)
    data.setup("fit")
    by_group = defaultdict(set)
    for rows in data.splits.values():
        for r in rows:
            by_group[r.group].add(r.query)
            assert r.positive != r.query and r.positive in by_group[r.group] | {r.positive}
    for rows in data.splits.values():
        for r in rows:
            assert r.positive in by_group[r.group]  # another caption of the same image
    assert sum(len(v) for v in data.splits.values()) == 40
    task = ImageTextAlignmentTask(ModelSpec(name=str(save_tiny_sentence_encoder(tmp_path / "encoder"))),
                                  monitor=MonitorSpec(early_stopping=False, save_best=False, save_last=False))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=QueryDocData(path=str(tmp_path / "aligned"), positive_from="group",
                                              query_column="text", group_column="group", batch_size=8))
    assert trainer.global_step >= 2 and "val/q2d_r@1" in trainer.callback_metrics
