"""How GRPO samples: with LoRA folded into a temporary copy of the base weights (the same tokens as the
adapted model, the trained weights restored bit for bit), and through the vLLM backend, driven here
against a recording engine since this machine has neither vLLM nor a GPU."""

from __future__ import annotations

import pytest
import torch

from support.text import write_jsonl
from mmtune import AdapterSpec, GRPOSpec, GRPOTask, ModelSpec, PromptData, RewardSpec
from mmtune.errors import ConfigError
from test_grpo import A_SHARE, _task, prompt_rows, qwen2  # noqa: F401  (qwen2 is a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def test_folded_adapters_sample_what_the_adapted_model_samples_and_restore_it_exactly(qwen2):
    from mmtune.adapters.folded import folded_adapters

    task = _task(qwen2)
    task.configure_model()
    with torch.no_grad():
        for name, p in task.net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    net = task.net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        adapted = net(input_ids=ids).logits
        with folded_adapters(net) as folded:
            once = net(input_ids=ids).logits
        base = net.get_base_model()
        with net.disable_adapter():
            plain = net(input_ids=ids).logits
    assert folded
    assert torch.allclose(once, adapted, atol=1e-5) and not torch.allclose(plain, adapted, atol=1e-3)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items()), "restored bit for bit"
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad is False
    torch.manual_seed(0)
    folded_sample = task._sample(_prompt_batch(task), 2, True, 1.0, 1.0)
    task.grpo_spec.fold_adapters = False
    torch.manual_seed(0)
    assert torch.equal(task._sample(_prompt_batch(task), 2, True, 1.0, 1.0), folded_sample)  # the same tokens
    assert folded_sample.shape[0] == 4


def _prompt_batch(task) -> dict:
    pad = task.tokenizer.pad_token_id
    return {"input_ids": torch.tensor([[pad, 21, 25, 27], [21, 25, 27, 29]]),
            "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}


def test_prompt_learning_is_sampled_as_it_is(qwen2):
    from mmtune.adapters.folded import folded_adapters

    task = _task(qwen2, adapter="prompt")
    task.configure_model()
    with folded_adapters(task.net) as folded:
        assert not folded


# ---- the vLLM backend, against a recording engine ---------------------------------------------------------------
class RecordingLLM:
    """Stands in for `vllm.LLM` (no GPU here): keeps copies of the weights pushed to it (vLLM copies them
    into its own buffers) and counts prefix-cache resets, and answers each prompt with fixed token lists.
    What it checks is mmtune's side of the exchange."""

    made: list["RecordingLLM"] = []

    def __init__(self, model, **kwargs):
        self.kwargs, self.pushed, self.resets, self.calls = kwargs, [], 0, []
        worker = type("W", (), {})()
        worker.model_runner = type("R", (), {})()
        worker.model_runner.model = type("M", (), {"load_weights": lambda _, items: self.pushed.append(
            {k: v.clone() for k, v in items})})()
        self.llm_engine = type("E", (), {})()
        self.llm_engine.model_executor = type("X", (), {"driver_worker": worker})()
        RecordingLLM.made.append(self)

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(([p["prompt_token_ids"] for p in prompts], params))
        completion = lambda ids: type("C", (), {"token_ids": ids})()  # noqa: E731
        return [type("O", (), {"outputs": [completion([5] * (1 + j)) for j in range(params.n)]})() for _ in prompts]


def test_the_vllm_backend_pushes_merged_weights_and_assembles_completions(tmp_path, qwen2, monkeypatch):
    import sys
    import types

    from mmtune.tasks import grpo_steps

    fake = types.ModuleType("vllm")
    fake.LLM = RecordingLLM
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(grpo_steps, "check_backend", lambda backend: None)  # as where vLLM and a GPU are present
    with pytest.raises(ConfigError, match="adapter.method 'prompt' does not merge"):
        GRPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="prompt"), grpo=GRPOSpec(backend="vllm"),
                 rewards=[RewardSpec(function=A_SHARE)])
    task = _task(qwen2, backend="vllm", num_generations=3, beta=0.0)
    task.configure_model()
    with torch.no_grad():  # adapters that change the output, so a merged push differs from the base weights
        for name, p in task.net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    base = task.net.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    want = (q_proj.base_layer.weight + q_proj.get_delta_weight("default")).detach().clone()
    before = {k: v.clone() for k, v in task.net.state_dict().items()}
    dm = PromptData(path=str(write_jsonl(tmp_path / "p.jsonl", prompt_rows(4, 0))), split=(1, 0, 0), batch_size=2)
    dm.setup("fit")
    dm.connect(task.tokenizer)
    batch = next(iter(dm.train_dataloader()))
    rollout = task._generate_rollout(batch, 3, True, 1.0, 1.0)
    engine = RecordingLLM.made[-1]
    pushed = engine.pushed[-1]
    assert not any("lora_" in k or "base_layer" in k for k in pushed)
    assert torch.allclose(pushed["model.layers.0.self_attn.q_proj.weight"], want, atol=1e-6)  # merged
    assert engine.resets == 1 and engine.kwargs["dtype"] == "float32"
    after = task.net.state_dict()  # folded into temporary weights: the trained ones come back bit for bit
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "the trained weights restored"
    prompts, params = engine.calls[-1]
    lengths = batch["attention_mask"].sum(1).tolist()
    assert [len(p) for p in prompts] == lengths and params.n == 3 and params.top_k == -1  # padding left out
    # three completions per prompt, of 1, 2 and 3 tokens of id 5, padded to the longest
    assert rollout.input_ids.shape == (6, batch["input_ids"].shape[1] + 3)
    pad = task.tokenizer.pad_token_id
    assert rollout.completion_ids[:3].tolist() == [[5, pad, pad], [5, 5, pad], [5, 5, 5]]
