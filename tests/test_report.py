"""The run report (`report.html`): written by `mmtune test`/`evaluate` and `mmtune report RUN_DIR`, every
section present (with a note where the run recorded nothing for it), opened in a real headless
Chromium with no broken image, and the example sections of every record kind."""

from __future__ import annotations

import base64
import binascii
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import only_version, run_cli, write_config
from mmtune.errors import ConfigError
from mmtune.evaluation.bootstrap import BootstrapSpec
from mmtune.evaluation.report import SECTION_IDS, build_report, write_report
from mmtune.evaluation.report.plots import roc_points
from mmtune.evaluation.run import summarize_test
from mmtune.evaluation.spec import EvaluationSpec
from mmtune.metrics.ranking import weighted_auroc
from mmtune.metrics.records import RecordSet, SampleRecord, write_records

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Page(HTMLParser):
    """The sections (id -> class) and <img> sources of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections[attrs.get("id")] = attrs.get("class")
        if tag == "img":
            self.images.append(attrs.get("src") or "")


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _decoded_images(page: _Page) -> list[Image.Image]:
    """Every <img> of the page as a decoded image; fails on any that is not an embedded, valid one."""
    out = []
    for src in page.images:
        assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), src[:60]
        try:
            data = base64.b64decode(src.split(",", 1)[1], validate=True)
        except binascii.Error as err:
            pytest.fail(f"an <img> whose data is not base64: {err}")
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.width > 8 and img.height > 8
        out.append(img)
    return out


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_models, color_set):
    """A calibrated classifier fitted, tested with a subgroup audit and evaluated against its last
    checkpoint through the CLI; the report after the test and a copy of the run as it was after the fit."""
    root = tmp_path_factory.mktemp("report")
    runs = root / "runs"
    cfg = write_config(root / "rep.yaml", tiny_models["vit"], color_set,
                       model_args={"adapter": {"method": "lora", "r": 4}, "calibration": "temperature"},
                       trainer={"max_epochs": 2, "log_every_n_steps": 1})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "rep")
    fit_only = root / "fit_only" / "version_0"
    shutil.copytree(run, fit_only)
    common = ["--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--evaluation.bootstrap.resamples", "50",
              "--evaluation.subgroups", "[group]", "--evaluation.min_group_size", "10"]
    run_cli("test", *common)
    after_test = (run / "report.html").read_text()
    run_cli("evaluate", *common, "--baseline", run / "checkpoints" / "last.ckpt")
    return {"run": run, "after_test": after_test, "fit_only": fit_only, "config": cfg}


def test_fit_and_test_write_a_report_with_every_section(classifier_run, capsys):
    page = _parse(classifier_run["after_test"])
    assert list(page.sections) == list(SECTION_IDS)
    recorded = {"config", "data", "training", "test", "confusion", "curves", "calibration", "subgroups", "errors"}
    assert {s for s, css in page.sections.items() if css == "present"} == recorded
    html = classifier_run["after_test"]
    assert "Not recorded for this run: a baseline comparison" in html  # no evaluate yet
    assert "By group" in html and "badge warn" in html  # a group of fewer than 10 samples is flagged
    metrics = json.loads((classifier_run["run"] / "metrics.json").read_text())
    assert f"on {metrics['test']['samples']} samples" in html  # the headline
    stats = json.loads((classifier_run["run"] / "data_stats.json").read_text())
    sizes = {name: s["samples"] for name, s in stats["splits"].items()}
    assert sum(sizes.values()) == 48 and f"train {sizes['train']} · val {sizes['val']} · test {sizes['test']}" in html
    assert len(_decoded_images(page)) >= 4  # curves, ROC/PR, reliability, subgroup plot (and any error thumbnails)


def test_evaluate_adds_the_comparison_and_prints_the_report_path(classifier_run, capsys):
    run = classifier_run["run"]
    html = (run / "report.html").read_text()
    page = _parse(html)
    assert page.sections["comparison"] == "present"
    comparison = json.loads((run / "evaluation" / "comparison.json").read_text())["comparison"]
    overall = [name for name in comparison if "/" not in name]
    better = sum(comparison[n]["verdict"] == "better" for n in overall)
    assert f"on {better} of {len(overall)} metrics" in html
    assert "paired bootstrap of the difference" in html


def test_report_on_a_run_with_only_a_fit_says_what_is_missing(classifier_run, capsys):
    run = classifier_run["fit_only"]
    run_cli("report", run)
    out = capsys.readouterr().out
    assert "not recorded for this run: test results (run `mmtune test" in out
    assert f"[mmtune] report: {run / 'report.html'}" in out
    page = _parse((run / "report.html").read_text())
    assert list(page.sections) == list(SECTION_IDS)
    assert page.sections["training"] == "present" and page.sections["config"] == "present"
    assert all(page.sections[s] == "absent" for s in ("test", "comparison", "confusion", "curves", "errors"))
    assert "No test results yet" in (run / "report.html").read_text()
    _decoded_images(page)


def test_report_refuses_a_folder_that_is_not_a_run_and_survives_a_damaged_file(tmp_path, classifier_run, capsys):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        write_report(tmp_path)
    with pytest.raises(SystemExit):
        run_cli("report", tmp_path / "nowhere")
    assert f"{tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(classifier_run["fit_only"], damaged)
    (damaged / "metrics.json").write_text('{"fit": {"best_step": ')
    report = build_report(damaged)
    assert any("metrics.json: could not be read" in m for m in report.missing)
    assert "Some files could not be read: metrics.json" in report.html
    assert _parse(report.html).sections["training"] == "present"  # the curves are still there


def test_a_failing_report_is_a_warning_and_keeps_the_test_results(classifier_run, tmp_path, monkeypatch, caplog):
    import mmtune.evaluation.report as report

    run = tmp_path / "runs" / "rep" / "version_0"
    shutil.copytree(classifier_run["fit_only"], run, ignore=shutil.ignore_patterns("report.html"))

    def broken(run_dir):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr(report, "write_report", broken)
    run_cli("test", "--config", classifier_run["config"], "--runs_dir", tmp_path / "runs", "--ckpt_path",
            run / "checkpoints" / "best.ckpt", "--evaluation.bootstrap.resamples", "20")
    assert "the run report was not written (RuntimeError: no fonts on this machine)" in caplog.text
    assert json.loads((run / "metrics.json").read_text())["test"]["intervals"]["accuracy"]["value"] is not None
    assert not (run / "report.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_broken_images(classifier_run, tmp_path):
    report = classifier_run["run"] / "report.html"
    url = report.resolve().as_uri()
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,4000"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=120)
    with Image.open(shot) as img:
        assert img.size == (1280, 4000)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50  # a real page, not one blank colour
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, timeout=120, text=True).stdout
    page = _parse(dom)
    assert list(page.sections) == list(SECTION_IDS)
    assert all(f'href="#{s}"' in dom for s in SECTION_IDS)  # the table of contents
    images = _decoded_images(page)
    assert len(images) == len(_parse(report.read_text()).images) >= 4


def _hand_run(tmp_path: Path, name: str, records: RecordSet) -> Path:
    """A run directory as `mmtune test` leaves it: records, and metrics.json's test entry with intervals."""
    run = tmp_path / name / "version_0"
    write_records(run / "records" / "test.jsonl", records)
    summarize_test(run, records, EvaluationSpec(bootstrap=BootstrapSpec(resamples=30)))
    return run


def test_error_gallery_shows_the_most_confident_mistakes_first_and_notes_missing_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 90, 200)).save(images / f"{i}.png")
    logits = [[4.0, 0.0], [0.0, 1.0], [0.2, 0.0], [3.0, 0.0], [0.0, 2.0]]
    targets = [1, 0, 1, 0, 1]  # wrong: 0 (p 0.98), 1 (p 0.73), 2 (p 0.55); right: 3, 4
    paths = [images / "0.png", images / "1.png", images / "gone.png", images / "2.png", images / "2.png"]
    records = RecordSet("classification", [
        SampleRecord(f"row {i}", [t], [int(np.argmax(z))], z, meta={"path": str(p), "site": "north"})
        for i, (z, t, p) in enumerate(zip(logits, targets, paths))], {"classes": ["normal", "pneumonia"]})
    html = build_report(_hand_run(tmp_path, "cls", records)).html
    page = _parse(html)
    assert page.sections["errors"] == "present" and page.sections["confusion"] == "present"
    gallery = html.split('class="gallery"')[1]
    assert gallery.index("row 0") < gallery.index("row 1") < gallery.index("row 2")
    assert "row 3" not in gallery and "(98%)" in gallery and "site: north" in gallery
    assert "3 of 5 test samples are wrong" in html and "1 image file(s) could not be shown" in html
    assert "image not found" in gallery
    thumbnails = [src for src in page.images if src.startswith("data:image/jpeg")]
    assert len(thumbnails) == 2 and len(_decoded_images(page)) >= 4
    assert '<td class="num heat"' in html.split('id="confusion"')[1]  # recomputed from the records


def test_generation_language_model_and_preference_runs_show_their_samples(tmp_path):
    refs = ["a small crack near the edge", "no defect", "two spots on the left", "a long scratch"]
    preds = ["a crack near the edge", "no defect", "a large dent", "scratch"]
    gen = RecordSet("generation", [SampleRecord(f"s{i}", r, p, stats={"loss_sum": 3.0 + i, "tokens": 5},
                                                meta={"question": f"what is on part {i}?", "images": []})
                                   for i, (r, p) in enumerate(zip(refs, preds))])
    page = _parse((html := build_report(_hand_run(tmp_path, "gen", gen)).html))
    assert page.sections["samples"] == "present" and page.sections["retrieval"] == "absent"
    weakest = html.split("The weakest by ROUGE-L")[1]
    assert weakest.index("a large dent") < weakest.index("a crack near the edge")  # worst first
    assert "what is on part 2?" in html

    lm = RecordSet("language_model", [SampleRecord(f"data.jsonl line {i}", stats={"loss_sum": 2.0 * i, "tokens": 4},
                                                   meta={"source": f"src{i}"}) for i in range(1, 6)])
    html = build_report(_hand_run(tmp_path, "lm", lm)).html
    assert _parse(html).sections["samples"] == "present"
    assert html.index("data.jsonl line 5") < html.index("data.jsonl line 1")  # the hardest first

    pref = RecordSet("preference", [SampleRecord(f"pairs.jsonl line {i}", stats={"reward_margin": m, "accuracy": float(m > 0),
                                                                                 "loss": 0.7 - m / 10},
                                                 meta={"topic": "tone"}) for i, m in enumerate([0.8, -0.4, 0.1])])
    html = build_report(_hand_run(tmp_path, "pref", pref)).html
    assert _parse(html).sections["samples"] == "present"
    assert "rewards the rejected reply higher on 1" in html and "rejected preferred" in html


def test_retrieval_run_shows_the_worst_queries_with_their_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    rows = []
    for i, rank in enumerate([0, 7, 2, 11]):
        path = images / f"{i}.png"  # the last one does not exist: shown as a note, not a broken image
        meta = {"path": str(path), "text": f"caption {i}", "group": f"p{i}"}
        rows.append(SampleRecord(f"image_to_text:{i}", stats={"rank": float(rank)}, meta={"direction": "image_to_text", **meta}))
        rows.append(SampleRecord(f"text_to_image:{i}", stats={"rank": float(3 - i)}, meta={"direction": "text_to_image", **meta}))
    records = RecordSet("retrieval", rows, {"recall_at": [1, 5]})
    html = build_report(_hand_run(tmp_path, "ret", records)).html
    page = _parse(html)
    assert page.sections["retrieval"] == "present" and page.sections["samples"] == "absent"
    section = html.split('id="retrieval"')[1]
    assert "image_to_text" in section and "text_to_image" in section
    assert "1 image file(s) could not be shown" in section and "image not found" in section
    assert "found first for 25%" in section
    first_rank = section.split("<tbody>")[1].split("</tr>")[0]
    assert ">12<" in first_rank  # the worst image query (0-based rank 11) comes first
    assert len(_decoded_images(page)) == 3


def test_roc_points_give_the_auroc_of_the_ranking_metric_with_ties():
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(0, 1, 300), 1)  # many ties
    positive = rng.random(300) < 1 / (1 + np.exp(-2 * scores))
    fpr, tpr, recall, precision = roc_points(scores, positive)
    assert np.trapezoid(tpr, fpr) == pytest.approx(float(weighted_auroc(scores, positive)[0]), abs=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(recall) >= 0)
    assert recall[-1] == 1.0 and recall[-2] < 1.0  # the PR curve stops where recall first reaches 1
