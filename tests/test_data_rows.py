"""Every training row is used each epoch: the last short batch trains (padded by one row when it would
be a batch of one, which BatchNorm refuses), on one process and sharded over two."""

from __future__ import annotations

import json
import socket
from collections import Counter

import pytest
import torch

from conftest import make_color_set, run_cli, write_config, write_csv
from mmtune.data.samplers import EpochSampler, ResumableLoader
from support import ddp_rows_worker
from support.killer import with_callback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_epoch(per_rank: list[list[list[int]]], n: int, batch_size: int, world: int) -> None:
    """Every row seen, each at least once; repeats only the padding; equal batch counts; no batch of one."""
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(n)), f"rows never trained: {set(range(n)) - set(seen)}"
    share = -(-n // world)  # DistributedSampler's shard: ceil(n / world)
    padded = share + (1 if batch_size > 1 and share % batch_size == 1 else 0)
    assert sum(seen.values()) == padded * world
    assert len({len(batches) for batches in per_rank}) == 1  # no process waits for another's extra batch
    assert all(len(b) > 1 for batches in per_rank for b in batches)


@pytest.mark.parametrize("n,batch_size", [(10, 4), (9, 4), (8, 4), (33, 8), (3, 2), (5, 8)])
def test_one_process_trains_every_row_and_the_short_batch(n, batch_size):
    sampler = EpochSampler(n, seed=1).no_single_item_batch(batch_size)
    loader = ResumableLoader(ddp_rows_worker.Rows(n), batch_size=batch_size, sampler=sampler)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = [b.tolist() for b in loader]
        _check_epoch([batches], n, batch_size, 1)
        if n % batch_size > 1:  # a short last batch of its own size, not padded to a full one
            assert len(batches[-1]) == n % batch_size


def test_two_processes_train_every_row(tmp_path):
    cases = [(10, 4), (9, 2), (11, 4), (33, 8), (3, 4)]
    out = tmp_path / "seen.pt"
    # spawn, not fork: a fork after this process ran torch ops can hang in the children's thread pools
    torch.multiprocessing.spawn(ddp_rows_worker.run, args=(2, _free_port(), cases, str(out)), nprocs=2, join=True)
    seen = torch.load(out)
    for n, batch_size in cases:
        _check_epoch(seen[f"{n}/{batch_size}"], n, batch_size, 2)


def test_a_fit_with_batchnorm_trains_every_row_when_one_would_be_left_over(tmp_path, tiny_models):
    """9 training rows in batches of 4: the remainder of one is padded to two, since a batch of one
    fails in the ResNet's BatchNorm (1x1 feature maps at 32 px) and dropping it would waste a row."""
    manifest = make_color_set(tmp_path / "data", per_class=4)
    rows = [r.split(",") for r in manifest.read_text().splitlines()[1:]]
    split = write_csv(tmp_path / "split.csv", ["path", "label", "split"],
                      [(str(tmp_path / "data" / p), label, "train" if i < 9 else "val") for i, (p, label, _) in enumerate(rows)])
    config = write_config(tmp_path / "cfg.yaml", tiny_models["cnn"], split, data_args={"batch_size": 4, "group_column": None})
    recording = with_callback(config, tmp_path / "rec.yaml", "support.rows_seen.RecordRows", path=str(tmp_path / "rows.json"))
    run_cli("fit", "--config", recording, "--runs_dir", tmp_path / "runs", "--run_name", "rows")
    epochs = json.loads((tmp_path / "rows.json").read_text())
    assert len(epochs) == 2
    for batches in epochs.values():
        assert [len(b) for b in batches] == [4, 4, 2]
        _check_epoch([batches], 9, 4, 1)
