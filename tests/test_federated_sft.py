"""Federated text SFT: two sites fine-tune a tiny causal LM with LoRA; only the adapter travels, and the
global model is an ordinary checkpoint `mmtune test` loads."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli
from support.text import build_model, repeat_rows, sft_config, write_jsonl

flwr = pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.mark.slow
def test_two_site_sft_federation_exchanges_only_lora_and_its_checkpoint_tests(tmp_path):
    from mmtune.federated import client
    from mmtune.federated.server import run_federation
    from mmtune.federated.simulation import InProcessGrid, site_contexts
    from mmtune.federated.spec import federated_spec

    model_dir = build_model("llama", tmp_path / "lm")
    rows = repeat_rows(32, seed=1)
    sites = [write_jsonl(tmp_path / f"site{k}.jsonl", rows[k::2]) for k in range(2)]  # each site's own file
    held_out = write_jsonl(tmp_path / "held_out.jsonl", repeat_rows(8, seed=2))
    cfg = sft_config(tmp_path / "sft.yaml", model_dir, {"path": str(sites[0]), "val_path": str(held_out),
                                                         "test_path": str(held_out)}, trainer={"max_epochs": 1})
    sent: list[dict] = []

    def spy(app, message, context):
        reply = app(message, context)
        if message.metadata.message_type == "train":
            sent.append({k: tuple(v.shape) for k, v in reply.content["arrays"].items()})
        return reply

    run_dir = tmp_path / "run"
    client.forget_sites()
    try:
        grid = InProcessGrid(client.app, site_contexts(cfg, sites, run_dir), spy)
        spec = federated_spec({"rounds": 1, "min_sites": 2})
        report = run_federation(grid, yaml.safe_load(cfg.read_text()), spec, run_dir, str(sites[0]))
    finally:
        client.forget_sites()

    assert len(sent) == 2 and sent[0] == sent[1]
    assert sent[0] and all("lora_A" in k or "lora_B" in k for k in sent[0]), sorted(sent[0])
    assert report["bytes_per_message"]["share"] < 0.2
    trained = report["rounds"][-1]
    assert set(trained["sites"]) == {"site_0", "site_1"} and trained["bytes_received"] > 0
    assert "val/loss" in trained["global_val"] or "loss" in trained["global_val"]
    server_loss = trained["global_test"]["test/loss"]
    assert server_loss < report["rounds"][0]["global_test"]["test/loss"]  # one round already helps

    ckpt = run_dir / "checkpoints" / "global.ckpt"
    run_cli("test", "--config", cfg, "--ckpt_path", ckpt)  # writes into the checkpoint's run directory
    test = json.loads((run_dir / "metrics.json").read_text())["test"]["metrics"]
    assert abs(test["test/loss"] - server_loss) < 1e-4 * max(1.0, server_loss)  # the checkpoint is the global model
