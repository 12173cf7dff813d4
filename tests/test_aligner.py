"""The image-text pair aligner (`mmtune.data.align`, `mmtune data align`) on small data made here."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from datasets import load_from_disk
from PIL import Image

from mmtune.cli import main
from mmtune.data.align import AlignSpec, PIIScrubber, PIISpec, ProblemPolicy, align_pairs, save_aligned
from mmtune.data.align.checks import missing_files
from mmtune.errors import ConfigError, DataError


def image(path: Path, shade: int) -> Path:
    """A 4x4 PNG whose bytes differ for each `shade` (so no two images are duplicates by accident)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade % 256, (shade * 7) % 256, (shade // 256) % 256)).save(path)
    return path


def table(path: Path, header: list[str], rows: list[list]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    return path


def rows_of(dataset) -> list[dict]:
    return [row for split in ("train", "val", "test") for row in dataset[split]]


def pairs_of(dataset) -> set[tuple[str, str]]:
    return {(Path(r["image"]).name, r["text"]) for r in rows_of(dataset)}


def spec(images, texts, **kwargs) -> AlignSpec:
    kwargs.setdefault("split", (1.0, 0.0, 0.0))
    return AlignSpec(images=str(images), texts=str(texts), **kwargs)


# --- joins ---------------------------------------------------------------------------------------------

def test_stem_join_folder_with_table(tmp_path):
    for i, name in enumerate(("a", "b", "c")):
        image(tmp_path / "imgs" / "sub" / f"{name}.png", i)
    texts = table(tmp_path / "texts.csv", ["id", "text", "label"],
                  [["a", "cat", "x"], ["b.png", "dog", "y"], ["imgs/zzz.jpg", "lost", "z"]])
    dataset, report = align_pairs(spec(tmp_path / "imgs", texts))
    assert pairs_of(dataset) == {("a.png", "cat"), ("b.png", "dog")}  # `b.png` and `a` both count by stem
    assert {r["key"] for r in rows_of(dataset)} == {"a", "b"}
    assert all(os.path.isabs(r["image"]) and os.path.isfile(r["image"]) for r in rows_of(dataset))
    assert {r["label"] for r in rows_of(dataset)} == {"x", "y"}  # extra columns are kept
    assert report["matched"] == {"pairs": 2, "images": 2, "texts": 2}
    assert report["unmatched_images"]["count"] == 1 and report["unmatched_images"]["examples"][0]["key"] == "c"
    assert report["unmatched_texts"] == {"count": 1, "examples": [{"where": f"{texts} row 4", "key": "zzz"}]}


def test_column_join_is_one_to_many_both_ways(tmp_path):
    for i, name in enumerate(("s1_front", "s1_side", "s2_front")):
        image(tmp_path / f"{name}.png", i)
    manifest = table(tmp_path / "images.csv", ["path", "study"],
                     [["s1_front.png", "S1"], ["s1_side.png", "S1"], ["s2_front.png", "S2"]])
    texts = table(tmp_path / "texts.jsonl", ["study", "text"],
                  [["S1", "report one"], ["S2", "caption a"], ["S2", "caption b"], ["S3", "no images"]])
    dataset, report = align_pairs(spec(manifest, texts, key="column", key_column="study"))
    assert pairs_of(dataset) == {("s1_front.png", "report one"), ("s1_side.png", "report one"),
                                 ("s2_front.png", "caption a"), ("s2_front.png", "caption b")}
    assert report["matched"] == {"pairs": 4, "images": 3, "texts": 3} and report["rows"] == 4
    assert len({r["id"] for r in rows_of(dataset)}) == 4  # ids are unique per pair
    assert report["unmatched_texts"]["examples"][0]["where"] == f"{texts} line 4"


def test_image_key_column_can_differ_from_text_key_column(tmp_path):
    image(tmp_path / "x.png", 1)
    manifest = table(tmp_path / "images.csv", ["path", "study_uid"], [["x.png", "1.2.840.5"]])
    texts = table(tmp_path / "texts.csv", ["accession", "text"], [["1.2.840.5", "dotted ids stay whole"]])
    dataset, _ = align_pairs(spec(manifest, texts, key="column", key_column="accession", image_key_column="study_uid"))
    assert pairs_of(dataset) == {("x.png", "dotted ids stay whole")}


def test_regex_join_with_a_folder_of_txt_reports(tmp_path):
    image(tmp_path / "imgs" / "p1" / "p1_s100_frontal.png", 1)
    image(tmp_path / "imgs" / "p1" / "p1_s100_lateral.png", 2)
    image(tmp_path / "imgs" / "p2" / "p2_s200_frontal.png", 3)
    image(tmp_path / "imgs" / "p2" / "scout.png", 4)  # no key: unmatched
    (tmp_path / "reports" / "2021").mkdir(parents=True)
    (tmp_path / "reports" / "2021" / "report_s100.txt").write_text("Lungs clear.\n")
    (tmp_path / "reports" / "report_s200.txt").write_text("Small effusion.")
    (tmp_path / "reports" / "report_s300.txt").write_text("Orphan.")
    dataset, report = align_pairs(spec(tmp_path / "imgs", tmp_path / "reports", key="regex",
                                       image_regex=r"_s(\d+)_", text_regex=r"report_s(\d+)"))
    assert pairs_of(dataset) == {("p1_s100_frontal.png", "Lungs clear."), ("p1_s100_lateral.png", "Lungs clear."),
                                 ("p2_s200_frontal.png", "Small effusion.")}
    assert {r["group"] for r in rows_of(dataset)} == {"100", "200"}  # the key is the default group
    assert report["unmatched_images"]["count"] == 1 and report["unmatched_images"]["examples"][0]["key"] is None
    assert report["unmatched_texts"]["examples"][0]["where"].endswith("report_s300.txt")

    # the same join with the regex on relative paths: the study is a folder name, the file names say nothing
    image(tmp_path / "by_path" / "s7" / "1.png", 5)
    image(tmp_path / "by_path" / "s8" / "1.png", 6)
    texts = table(tmp_path / "t.csv", ["id", "text"], [["study-7", "seven"], ["study-8", "eight"]])
    dataset, _ = align_pairs(spec(tmp_path / "by_path", texts, key="regex", regex_on="path",
                                  image_regex=r"^s(\d+)/", text_regex=r"study-(\d+)"))
    assert {(Path(r["image"]).parent.name, r["text"]) for r in rows_of(dataset)} == {("s7", "seven"), ("s8", "eight")}


def test_list_mode_keeps_the_views_of_a_text_together(tmp_path):
    image(tmp_path / "s1_front.png", 1)
    image(tmp_path / "s1_side.png", 2)
    (tmp_path / "s1_bad.png").write_bytes(b"not an image")
    (tmp_path / "s2_bad.png").write_bytes(b"not an image either")
    texts = table(tmp_path / "texts.csv", ["id", "text"], [["s1", "two views"], ["s2", "only a corrupt view"]])
    dataset, report = align_pairs(spec(tmp_path, texts, key="regex", image_regex=r"^(s\d+)_", mode="list"))
    rows = rows_of(dataset)
    assert len(rows) == 1
    assert [Path(p).name for p in rows[0]["image"]] == ["s1_front.png", "s1_side.png"]  # corrupt view removed
    assert rows[0]["id"] == "texts.csv:2"
    assert dataset["train"].features["image"].feature.dtype == "string"
    assert report["dropped"]["unreadable_image"]["count"] == 2
    assert report["dropped"]["no_images_left"]["count"] == 1
    assert report["dropped"]["no_images_left"]["examples"][0]["where"] == f"{texts} row 3"


# --- checks and policies ----------------------------------------------------------------------------------

@pytest.fixture
def troubled(tmp_path) -> tuple[Path, Path]:
    """A manifest and texts with one of each problem (and two good pairs)."""
    image(tmp_path / "good1.png", 1)
    image(tmp_path / "good2.png", 2)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    copy = image(tmp_path / "orig.png", 3)
    (tmp_path / "copy.png").write_bytes(copy.read_bytes())
    image(tmp_path / "blank.png", 4)
    image(tmp_path / "long.png", 5)
    manifest = table(tmp_path / "images.csv", ["path"],
                     [["good1.png"], ["missing.png"], ["corrupt.png"], ["orig.png"], ["copy.png"], ["good2.png"],
                      ["blank.png"], ["long.png"]])
    texts = table(tmp_path / "texts.csv", ["id", "text"],
                  [["good1", "fine"], ["missing", "text of a missing file"], ["corrupt", "text of a corrupt file"],
                   ["orig", "first copy"], ["copy", "second copy"], ["good2", "also fine"], ["blank", " \t "],
                   ["long", "word " * 30]])
    return manifest, texts


def test_each_problem_is_dropped_with_its_reason(troubled):
    manifest, texts = troubled
    dataset, report = align_pairs(spec(manifest, texts, max_chars=100))
    assert pairs_of(dataset) == {("good1.png", "fine"), ("good2.png", "also fine"), ("orig.png", "first copy")}
    dropped = report["dropped"]
    assert {k: v["count"] for k, v in dropped.items()} == {
        "missing_image": 1, "unreadable_image": 1, "duplicate_image": 1, "empty_text": 1, "too_long": 1,
        "no_images_left": 3}
    # the texts of the three dropped images are accounted for too: texts read = used + unmatched + dropped
    assert [e["where"] for e in dropped["no_images_left"]["examples"]] == [f"{texts} row {r}" for r in (3, 4, 6)]
    assert dropped["missing_image"]["examples"] == [
        {"where": f"{manifest} row 3: {manifest.parent / 'missing.png'}", "detail": "file not found"}]
    assert dropped["unreadable_image"]["examples"][0]["where"].endswith("corrupt.png")
    assert dropped["duplicate_image"]["examples"][0]["detail"] == f"same bytes as {manifest.parent / 'orig.png'}"
    assert dropped["empty_text"]["examples"] == [{"where": f"{texts} row 8", "detail": "empty text"}]
    assert dropped["too_long"]["examples"] == [{"where": f"{texts} row 9", "detail": "149 characters > max_chars 100"}]


def test_word_limit(troubled):
    manifest, texts = troubled
    _, report = align_pairs(spec(manifest, texts, max_words=29))
    assert report["dropped"]["too_long"]["examples"][0]["detail"] == "30 words > max_words 29"
    _, report = align_pairs(spec(manifest, texts, max_words=30))
    assert report["dropped"]["too_long"]["count"] == 0


@pytest.mark.parametrize("problem,named", [
    ("missing_image", "images.csv row 3: "), ("unreadable_image", "corrupt.png"), ("duplicate_image", "copy.png"),
    ("empty_text", "texts.csv row 8"), ("too_long", "texts.csv row 9")])
def test_error_policy_stops_naming_the_file_or_row(troubled, problem, named):
    manifest, texts = troubled
    with pytest.raises(DataError, match=f"policy.{problem}: error") as err:
        align_pairs(spec(manifest, texts, max_chars=100, policy=ProblemPolicy(**{problem: "error"})))
    assert named in str(err.value)


def test_default_policy_applies_to_every_problem(troubled):
    manifest, texts = troubled
    with pytest.raises(DataError, match="missing image"):
        align_pairs(spec(manifest, texts, policy=ProblemPolicy(default="error")))
    # checks switched off find nothing, so nothing stops the run
    dataset, report = align_pairs(spec(manifest, texts, check_files=False, check_images=False, check_duplicates=False,
                                       policy=ProblemPolicy(default="error", empty_text="drop")))
    assert ("corrupt.png", "text of a corrupt file") in pairs_of(dataset)
    assert ("copy.png", "second copy") in pairs_of(dataset)
    assert report["checks"] == ["empty_text"]


def test_missing_files_lists_large_directories_and_stats_small_ones(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    for i in range(40):
        if i % 3:
            (big / f"{i}.png").touch()
    (big / "sub.png").mkdir()  # a directory is not a file
    paths = ([str(big / f"{i}.png") for i in range(40)] + [str(big / "sub.png"), str(tmp_path / "few.png")]
             + [str(tmp_path / "nowhere" / f"{i}.png") for i in range(20)])
    (tmp_path / "few.png").touch()
    assert sorted(missing_files(paths)) == [i for i, p in enumerate(paths) if not os.path.isfile(p)]


# --- PII ----------------------------------------------------------------------------------------------------

MEASUREMENTS = ("A 3.5 cm nodule, T2 hyperintense, C5-C6 disc, L4-5, BP 120/80, 12 x 8 mm lesion, 1.5T MRI, "
                "grade 2/4, EF 55-60%, at 10:30, 0.5 x 0.3 x 0.2 cm, series 3 image 45, 150000 platelets, T1/T2.")


def test_pii_scrubber_counts_each_kind_and_leaves_measurements_alone():
    scrub = PIIScrubber()
    assert scrub(MEASUREMENTS) == MEASUREMENTS
    text = ("Seen 2021-03-04 and on 03/04/2021 and March 4, 2021 by dr.smith@hospital.org, call (555) 123-4567 "
            "or +44 20 7946 0958. MRN: 1234567, accession 98765432. A 3.5 cm mass.")
    assert scrub(text) == ("Seen [DATE] and on [DATE] and [DATE] by [EMAIL], call [PHONE] or [PHONE]. MRN: [ID], "
                           "accession [ID]. A 3.5 cm mass.")
    assert dict(scrub.counts) == {"email": 1, "date": 3, "phone": 2, "id": 2}
    not_dates = "13/13/2020, 45/12/2020, Jar 5, 2020, 32 March 2021, 12 14 16 18 mm, version 1.2.3"
    assert scrub(not_dates) == not_dates and sum(scrub.counts.values()) == 8


def test_pii_user_patterns_and_kinds():
    scrub = PIIScrubber(kinds=["email"], patterns={"name": r"\bDr\.? [A-Z][a-z]+"})
    assert scrub("Dr. Jones wrote to a@b.io on 2021-03-04") == "[NAME] wrote to [EMAIL] on 2021-03-04"
    assert dict(scrub.counts) == {"name": 1, "email": 1}


def test_pii_through_the_aligner(tmp_path):
    image(tmp_path / "imgs" / "a.png", 1)
    image(tmp_path / "imgs" / "b.png", 2)
    texts = table(tmp_path / "t.csv", ["id", "text"],
                  [["a", "Call 555-123-4567 on 01/02/2020."], ["b", MEASUREMENTS], ["zzz", "unmatched a@b.io"]])
    dataset, report = align_pairs(spec(tmp_path / "imgs", texts, pii=PIISpec(enabled=True)))
    assert {r["text"] for r in rows_of(dataset)} == {"Call [PHONE] on [DATE].", MEASUREMENTS}
    assert report["pii"] == {"email": 0, "date": 1, "phone": 1, "id": 0}  # unmatched texts are not scrubbed


def test_too_long_is_measured_after_scrubbing(tmp_path):
    image(tmp_path / "imgs" / "a.png", 1)
    texts = table(tmp_path / "t.csv", ["id", "text"], [["a", "x@averyveryverylongdomain.example.org"]])
    dataset, _ = align_pairs(spec(tmp_path / "imgs", texts, max_chars=10, pii=PIISpec(enabled=True)))
    assert [r["text"] for r in rows_of(dataset)] == ["[EMAIL]"]


# --- splits -------------------------------------------------------------------------------------------------

@pytest.fixture
def patients(tmp_path) -> tuple[Path, Path]:
    """30 patients, each with 1-3 studies of 2 views."""
    rows, n = [], 0
    for p in range(30):
        for s in range(1 + p % 3):
            study = f"p{p}s{s}"
            for view in ("front", "side"):
                image(tmp_path / "imgs" / f"{study}_{view}.png", n)
                n += 1
            rows.append([study, f"report of {study}", f"p{p}", "test" if p < 5 else "train"])
    return tmp_path / "imgs", table(tmp_path / "reports.csv", ["study", "text", "patient", "source_split"], rows)


def test_groups_never_cross_splits(patients):
    images, texts = patients
    made = spec(images, texts, key="regex", image_regex=r"^(p\d+s\d+)_", key_column="study", group_column="patient",
                split=(0.5, 0.25, 0.25), seed=3)
    dataset, report = align_pairs(made)
    split_of: dict[str, set] = {}
    for name in ("train", "val", "test"):
        assert len(dataset[name]) > 0
        for row in dataset[name]:
            split_of.setdefault(row["patient"], set()).add(name)
            assert row["group"] == row["patient"]
    assert len(split_of) == 30 and all(len(s) == 1 for s in split_of.values())
    assert report["groups_in_several_splits"] == 0
    assert sum(v["groups"] for v in report["splits"].values()) == 30
    again, _ = align_pairs(made)
    assert again["val"]["id"] == dataset["val"]["id"]  # seeded


def test_source_split_column_is_kept(patients, tmp_path):
    images, texts = patients
    dataset, report = align_pairs(spec(images, texts, key="regex", image_regex=r"^(p\d+s\d+)_", key_column="study",
                                       split_column="source_split"))
    assert set(dataset["test"]["patient"]) == {f"p{p}" for p in range(5)} and len(dataset["val"]) == 0
    assert report["splits"]["val"] == {"rows": 0, "groups": 0}
    bad = table(tmp_path / "bad.csv", ["study", "text", "source_split"], [["p0s0", "x", "train"], ["p1s0", "y", "holdout"]])
    with pytest.raises(DataError, match=r"bad.csv row 3: split_column 'source_split' is 'holdout'"):
        align_pairs(spec(images, bad, key="regex", image_regex=r"^(p\d+s\d+)_", key_column="study",
                         split_column="source_split"))


# --- output -------------------------------------------------------------------------------------------------

def test_saved_dataset_and_report_load_back(patients, tmp_path):
    images, texts = patients
    dataset, report = align_pairs(spec(images, texts, key="regex", image_regex=r"^(p\d+s\d+)_", key_column="study",
                                       group_column="patient", split=(0.6, 0.2, 0.2), examples=2))
    report_path = save_aligned(dataset, report, str(tmp_path / "out"))
    loaded = load_from_disk(str(tmp_path / "out"))
    assert set(loaded) == {"train", "val", "test"}
    for name in loaded:
        assert loaded[name].to_dict() == dataset[name].to_dict()
    assert loaded["train"].column_names == ["id", "key", "image", "text", "group", "study", "patient", "source_split"]
    saved = json.loads(report_path.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["rows"] == 2 * 60 == sum(v["rows"] for v in saved["splits"].values())
    assert saved["matched"] == {"pairs": 120, "images": 120, "texts": 60}
    assert saved["columns"] == loaded["train"].column_names


def test_keep_columns_and_mixed_types(tmp_path):
    image(tmp_path / "imgs" / "a.png", 1)
    image(tmp_path / "imgs" / "b.png", 2)
    texts = table(tmp_path / "t.jsonl", ["id", "text", "score"], [["a", "one", 1], ["b", "two", "high"]])
    with pytest.raises(DataError, match="column 'score'"):
        align_pairs(spec(tmp_path / "imgs", texts))
    dataset, _ = align_pairs(spec(tmp_path / "imgs", texts, keep_columns=[]))
    assert dataset["train"].column_names == ["id", "key", "image", "text", "group"]
    with pytest.raises(DataError, match=r"no column 'site' \(keep_columns\)"):
        align_pairs(spec(tmp_path / "imgs", texts, keep_columns=["site"]))


def test_user_errors_name_the_option(tmp_path):
    image(tmp_path / "imgs" / "a.png", 1)
    texts = table(tmp_path / "t.csv", ["id", "text"], [["zzz", "no match"]])
    with pytest.raises(ConfigError, match="image_regex.*exactly one capture group"):
        align_pairs(spec(tmp_path / "imgs", texts, key="regex", image_regex=r"\d+"))
    with pytest.raises(DataError, match="needs an image manifest"):
        align_pairs(spec(tmp_path / "imgs", texts, key="column"))
    with pytest.raises(DataError, match=r"no image matched a text by key 'stem'.*\['a'\].*\['zzz'\]"):
        align_pairs(spec(tmp_path / "imgs", texts))
    with pytest.raises(DataError, match=r"no column 'caption' \(text_column\)"):
        align_pairs(spec(tmp_path / "imgs", texts, text_column="caption"))


# --- CLI ----------------------------------------------------------------------------------------------------

def test_cli_end_to_end(patients, tmp_path, capsys):
    images, texts = patients
    config = tmp_path / "align.yaml"
    config.write_text(f"images: {images}\ntexts: {texts}\nkey: regex\nimage_regex: '^(p\\d+s\\d+)_'\n"
                      "key_column: study\ngroup_column: patient\nmode: list\npii: {enabled: true}\n"
                      "policy: {default: error}\n")
    out = tmp_path / "out"
    main(["data", "align", "--config", str(config), "--split", "[0.6, 0.2, 0.2]", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "aligned 60 samples from 120 images and 60 texts" in printed and "report:" in printed
    loaded = load_from_disk(str(out))
    assert sum(len(loaded[s]) for s in loaded) == 60 and all(len(r) == 2 for r in loaded["train"]["image"])
    assert json.loads((out / "align_report.json").read_text())["mode"] == "list"


def test_cli_user_errors_exit_2_on_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("images: x\ntexts: y\nkeyy: stem\n")
    with pytest.raises(SystemExit) as exit_:
        main(["data", "align", "--config", str(config), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmtune: error: ") and "'keyy'" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["data", "align", "--images", str(tmp_path / "none"), "--texts", "t.csv", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "image source not found" in capsys.readouterr().err

