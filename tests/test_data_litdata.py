"""Classification data streamed from litdata chunks (`StreamingImageData`): written from a manifest by
`tools/make_litdata.py`, trained end to end, read through a bounded cache from a URL (`local:`, which
litdata fetches like object storage), resumed mid-epoch at the next batch, and refused when it is not
a litdata set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_color_set, only_version, run_cli
from mmtune import AugmentSpec, DataError, StreamingImageData

pytest.importorskip("litdata")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the same float sums in and out of process (conftest.py)

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "crop_pct": 1.0}
QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1}


@pytest.fixture(scope="module")
def optimized(tmp_path_factory) -> Path:
    """A 3-class color set (36 images) split 24/6/6 and written as litdata chunks of about 4 images."""
    from mmtune.data.litdata_write import convert

    root = tmp_path_factory.mktemp("litdata")
    manifest = make_color_set(root / "colors", per_class=12, groups=12)
    listing = convert(str(manifest), str(root / "optimized"), chunk_bytes="12KB", group_column="group",
                      split=(0.667, 0.167, 0.166))
    assert listing["samples"] == {"train": 24, "val": 6, "test": 6}
    return root / "optimized"


def _config(path: Path, model: Path, data: dict, trainer: dict, monitor: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"class_path": "ImageClassificationTask", "init_args": {
            "model": {"name": str(model)}, "optimizer": {"lr": 0.01, "warmup": 0.1},
            "monitor": monitor or {"early_stopping": False}}},
        "data": {"class_path": "StreamingImageData", "init_args": {"batch_size": 5, "num_workers": 0, **data}},
        "trainer": {**QUIET, **trainer}}, sort_keys=False))
    return path


def _module(root, **kwargs) -> StreamingImageData:
    dm = StreamingImageData(root=str(root), num_workers=0, **kwargs)
    dm.setup("fit")
    dm.connect(dm.classes, dm.multi_label, DATA_CONFIG)
    return dm


def test_the_tool_writes_splits_and_a_class_list_and_a_fit_trains_from_them(tmp_path, optimized, tiny_models):
    listing = json.loads((optimized / "classes.json").read_text())
    assert listing["classes"] == ["blue", "green", "red"] and listing["counts"]["train"] == {"blue": 8, "green": 8, "red": 8}
    assert len(list((optimized / "train").glob("chunk-*.bin"))) >= 4  # several chunks to stream
    config = _config(tmp_path / "fit.yaml", tiny_models["vit"], {"root": str(optimized), "cache_dir": str(tmp_path / "cache"),
                                                                 "augment": {"hflip": 0.5}}, {"max_epochs": 2})
    run_cli("fit", "--config", config, "--runs_dir", tmp_path / "runs", "--run_name", "stream")
    run_cli("test", "--config", config, "--runs_dir", tmp_path / "runs", "--run_name", "stream",
            "--ckpt_path", only_version(tmp_path / "runs", "stream") / "checkpoints" / "last.ckpt")
    metrics = json.loads((only_version(tmp_path / "runs", "stream") / "metrics.json").read_text())
    assert metrics["fit"]["global_step"] == 10  # 24 images in batches of 5: 5 a epoch, the short one trained
    assert "val/accuracy" in metrics["fit"]["metrics"] and "test/accuracy" in metrics["test"]["metrics"]


def test_items_are_standard_samples_with_every_training_image_once_an_epoch(optimized):
    dm = _module(optimized, batch_size=5)
    loader = dm.train_dataloader()
    epochs = [[b for b in loader] for _ in range(2)]
    assert epochs[0][0]["pixels"].shape == (5, 3, 32, 32) and epochs[0][0]["target"].dtype == torch.long
    for batches in epochs:
        assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 4]
        assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(24))
    assert [b["index"].tolist() for b in epochs[0]] != [b["index"].tolist() for b in epochs[1]]  # reshuffled
    # the stored labels are the manifest's: each image's brightest channel is its class's color
    brightest = [["red", "green", "blue"][c] for b in epochs[0] for c in b["pixels"].mean(dim=(2, 3)).argmax(1).tolist()]
    assert brightest == [dm.classes[t] for b in epochs[0] for t in b["target"].tolist()]


def test_a_url_root_streams_through_a_bounded_cache(tmp_path, optimized):
    """`local:` makes litdata fetch chunks into the cache as from object storage; with a budget of about two
    chunks it deletes chunks it has read, so the cache never holds the whole set."""
    chunks = sorted((optimized / "train").glob("chunk-*.bin"))
    budget = f"{2 * max(c.stat().st_size for c in chunks) + 1}B"
    cache = tmp_path / "cache"
    dm = _module(f"local:{optimized}", batch_size=2, cache_dir=str(cache), max_cache_size=budget)
    assert dm.classes == ["blue", "green", "red"]  # classes.json fetched through litdata's downloader
    seen, most = [], 0
    for batch in dm.train_dataloader():
        seen += batch["index"].tolist()
        most = max(most, len(list(cache.rglob("chunk-*.bin"))))
    assert sorted(seen) == list(range(24))
    assert 1 <= most < len(chunks), (most, len(chunks))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_mid_epoch_goes_on_at_the_next_batch_and_then_to_the_next_epoch(optimized, workers):
    """Lightning takes len(loader) batches and never exhausts the iterator: the epoch after a resumed
    one must still be the next epoch's order, not a replay of the resumed one."""
    def loader():
        dm = StreamingImageData(root=str(optimized), num_workers=workers, batch_size=5, augment=AugmentSpec(hflip=0.5))
        dm.setup("fit")
        dm.connect(dm.classes, dm.multi_label, DATA_CONFIG)
        return dm.train_dataloader()

    def take(it, n):
        return [next(it)["index"].tolist() for _ in range(n)]

    straight = loader()
    epochs = [take(iter(straight), 5) for _ in range(3)]
    first = loader()
    take(iter(first), 5)
    seen = take(iter(first), 2)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert seen + take(iter(resumed), 3) == epochs[1]
    assert take(iter(resumed), 5) == epochs[2]


@pytest.mark.slow
def test_a_kill_mid_epoch_resumes_at_the_next_batch_and_each_image_trains_once_an_epoch(tmp_path, optimized, tiny_models):
    from test_resume import _mmtune, _with_killer, assert_same_end

    runs = tmp_path / "runs"
    monitor = {"early_stopping": False, "save_last_every_n_steps": 1}
    base = _config(tmp_path / "fit.yaml", tiny_models["vit"], {"root": str(optimized), "augment": {"hflip": 0.5}},
                   {"max_epochs": 3}, monitor)

    def recording(out: Path, name: str, killer: bool) -> Path:
        config = _with_killer(base, out, epoch=1, batch=3) if killer else base
        data = yaml.safe_load(config.read_text())
        data["trainer"].setdefault("callbacks", []).append(  # after the killer: the killed batch is not recorded
            {"class_path": "support.rows_seen.AppendRows", "init_args": {"path": str(tmp_path / f"{name}.jsonl")}})
        out.write_text(yaml.safe_dump(data))
        return out

    run_cli("fit", "--config", recording(tmp_path / "straight.yaml", "straight", False), "--runs_dir", runs, "--run_name", "straight")
    _mmtune(["fit", "--config", recording(tmp_path / "killing.yaml", "resumed", True), "--runs_dir", runs,
             "--run_name", "resumed"], expect=-9)
    run = only_version(runs, "resumed")
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 8)  # 5 steps an epoch: killed before epoch 1's 4th batch
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["num_samples_yielded"] == 15  # litdata's own state, saved by Lightning
    run_cli("fit", "--config", recording(tmp_path / "resume.yaml", "resumed", False), "--runs_dir", runs,
            "--run_name", "resumed", "--ckpt_path", "last")
    rows = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")}
    assert [(r["epoch"], r["batch"], r["rows"]) for r in rows["resumed"]] == \
        [(r["epoch"], r["batch"], r["rows"]) for r in rows["straight"]]  # the very batches, none twice
    for epoch in range(3):
        assert sorted(i for r in rows["resumed"] if r["epoch"] == epoch for i in r["rows"]) == list(range(24))
    assert_same_end(run, only_version(runs, "straight"), last_epoch=2)


def test_roots_that_are_not_litdata_sets_are_named(tmp_path, optimized):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    with pytest.raises(DataError, match=r"empty/train: no litdata index.json"):
        _module(tmp_path / "empty")
    with pytest.raises(DataError, match=r"nowhere/train: .*index.json"):
        _module(f"local:{tmp_path / 'nowhere'}", classes=["a", "b"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"no classes.json; set data.classes"):
        _module(optimized / "train")  # a split folder, not the root
    (tmp_path / "empty" / "train" / "index.json").write_text(json.dumps({"chunks": [], "config": {}}))
    with pytest.raises(DataError, match=r"empty/train/index.json: the litdata index lists no chunks"):
        _module(tmp_path / "empty")
    import shutil

    shutil.copytree(optimized, tmp_path / "partial")
    (tmp_path / "partial" / "train" / "chunk-0-1.bin").unlink()
    with pytest.raises(DataError, match=r"partial/train/chunk-0-1.bin: a chunk the index lists is missing \(1 of \d+\)"):
        _module(tmp_path / "partial")


def test_a_set_of_pickled_items_is_refused(tmp_path):
    import litdata

    from mmtune.data.litdata_write import to_item  # noqa: F401  (imported for the same litdata setup)

    litdata.optimize(fn=_pickled_item, inputs=[0, 1], output_dir=str(tmp_path / "set" / "train"), chunk_size=2,
                     num_workers=1, verbose=False, start_method="fork")
    with pytest.raises(DataError, match=r"stored as 'pickle' would be unpickled"):
        _module(tmp_path / "set", classes=["a", "b"])


class _Opaque:
    pass


def _pickled_item(i: int) -> dict:
    return {"image": b"", "label": "a", "extra": _Opaque()}


def test_under_two_processes_each_rank_streams_its_own_part_in_equal_whole_batches(tmp_path, optimized):
    """litdata shards chunks by rank (`drop_last` under distributed training): each rank streams a
    disjoint part in whole batches, the same count on every rank, and the remainder waits for a later epoch."""
    import socket

    from support import ddp_litdata_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "seen.pt"
    torch.multiprocessing.spawn(ddp_litdata_worker.run, args=(2, port, str(optimized), 5, str(out)), nprocs=2, join=True)
    ranks = torch.load(out)
    assert [r["len"] for r in ranks] == [2, 2]  # 12 images a rank: two whole batches of 5
    for epoch in range(2):
        per_rank = [[i for b in r["epochs"][epoch] for i in b] for r in ranks]
        assert all(len(b) == 5 for r in ranks for b in r["epochs"][epoch])  # equal, whole batches
        assert len(per_rank[0]) + len(per_rank[1]) == 20  # 4 of 24 left out (fewer than world x batch size)
        assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0] + per_rank[1])) == 20  # no image twice
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled each epoch


def test_the_tool_writes_a_set_and_never_overwrites_one(tmp_path, optimized, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_litdata", Path(__file__).parent.parent / "tools" / "make_litdata.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    manifest = optimized.parent / "colors" / "manifest.csv"
    assert tool.main(["--source", str(manifest), "--out", str(optimized)]) == 2
    assert f"{optimized / 'train'}: a litdata set is already there" in capsys.readouterr().err
    assert tool.main(["--source", str(manifest), "--out", str(tmp_path / "out"), "--split", "1", "0", "0"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["samples"] == {"train": 36}
    assert StreamingImageData(root=str(tmp_path / "out"), num_workers=0).setup("fit") is None


def test_labels_by_name_index_or_several_become_targets():
    from mmtune.data.formats_litdata import ItemDecoder

    single = ItemDecoder(None, ["a", "b", "c"], False, 3, "min_max", "image", "label", "|", 0, False)
    assert single.labels(2, "x") == ["c"] and single.labels("b", "x") == ["b"]
    assert ItemDecoder(None, ["a", "b", "c"], True, 3, "min_max", "image", "label", "|", 0, False).labels("a|c", "x") == ["a", "c"]
    with pytest.raises(DataError, match=r"set\[3\]: label 'd' is not in the class list"):
        single.labels("d", "set[3]")
    with pytest.raises(DataError, match=r"label index 5 is outside the 3 classes"):
        single.labels(5, "set[3]")
