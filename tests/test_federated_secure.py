"""Secure aggregation: Flower's SecAgg+ in the in-process simulation gives the plain weighted average."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import make_color_set, write_config

flwr = pytest.importorskip("flwr")


@pytest.mark.slow
def test_secagg_plus_aggregate_equals_the_plain_weighted_average(tmp_path, tiny_models, monkeypatch):
    from mmtune.federated import secure
    from mmtune.federated.cli import simulate
    from mmtune.federated.site import Site

    manifest = make_color_set(tmp_path / "data", per_class=16, groups=4)
    config = write_config(tmp_path / "task.yaml", tiny_models["vit"], manifest,
                          model_args={"adapter": {"method": "lora", "r": 2, "alpha": 4}},
                          data_args={"group_column": None, "verify_images": False}, trainer={"max_epochs": 1})
    fed = tmp_path / "fed.yaml"
    secagg = {"clipping_range": 8.0, "max_weight": 64.0}  # max_weight near the sites' sizes: finer quantization
    fed.write_text(yaml.safe_dump({"federated": {"rounds": 1, "secure_aggregation": True, "min_sites": 3,
                                                 "secagg": secagg, "simulation": {"alpha": 5.0}}}))
    updates: list[tuple[dict, int]] = []  # what each site computed, before Flower's mod masked it
    fit_round = Site.fit_round

    def recording_fit(self, *args, **kwargs):
        result = fit_round(self, *args, **kwargs)
        updates.append(({k: v.clone() for k, v in result.tensors.items()}, result.samples))
        return result

    monkeypatch.setattr(Site, "fit_round", recording_fit)
    aggregates = []
    run_rounds = secure.run_secure_rounds

    def recording_rounds(*args, **kwargs):
        aggregates.append(run_rounds(*args, **kwargs))
        return aggregates[-1]

    monkeypatch.setattr(secure, "run_secure_rounds", recording_rounds)
    replies = []

    def spy(app, message, context):
        reply = app(message, context)
        replies.append((message.metadata.message_type, reply))
        return reply

    run_dir, report = simulate(str(config), str(fed), 3, "dirichlet", runs_dir=str(tmp_path / "runs"), handler=spy)

    assert len(updates) == 3 and len(aggregates) == 1
    total = sum(samples for _, samples in updates)
    plain = {k: sum(t[k].double() * n for t, n in updates) / total for k in updates[0][0]}
    secure_out = aggregates[0].to_torch_state_dict()
    assert set(secure_out) == set(plain)
    moved = max(float((plain[k] - updates[0][0][k].double()).abs().max()) for k in plain)
    assert moved > 1e-3  # the sites' updates differ, so the average is a real test
    # SecAgg+ quantizes each site's weighted update (samples / max_weight x tensor) to 2**22 steps over
    # +-clipping_range: the average is exact up to a few of those steps, scaled back by the weights
    step = 2 * secagg["clipping_range"] / 2**22 * secagg["max_weight"] / min(n for _, n in updates)
    for key, value in plain.items():
        torch.testing.assert_close(secure_out[key].double(), value, atol=3 * step, rtol=0)
    # the server never received a site's tensors: every train reply's arrays are empty (masked vectors
    # travel as SecAgg+ records), and four protocol stages ran per site
    train_replies = [r for kind, r in replies if kind == "train"]
    assert len(train_replies) == 4 * 3
    assert all(len(rec) == 0 for r in train_replies for rec in r.content.array_records.values())
    assert report["rounds"][-1]["global_test"] is not None and (run_dir / "checkpoints" / "global.ckpt").is_file()
    assert report["rounds"][-1]["bytes_sent"] > 0


def test_secure_aggregation_refuses_what_secagg_plus_cannot_do():
    from mmtune.errors import ConfigError
    from mmtune.federated.secure import check_secure_spec
    from mmtune.federated.spec import federated_spec

    with pytest.raises(ConfigError, match="fedavg only"):
        check_secure_spec(federated_spec({"secure_aggregation": True, "strategy": "fedprox"}), 3)
    with pytest.raises(ConfigError, match="privacy"):
        check_secure_spec(federated_spec({"secure_aggregation": True, "privacy": {"noise_multiplier": 1.0}}), 3)
    with pytest.raises(ConfigError, match="at least 2 sites"):
        check_secure_spec(federated_spec({"secure_aggregation": True}), 1)
    with pytest.raises(ConfigError, match="unknown key"):
        federated_spec({"secagg": {"shares": 3}})
