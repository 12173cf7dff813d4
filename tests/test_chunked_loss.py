"""The chunked token loss (`mmtune.losses.chunked`): equal loss and gradients to the plain loss over the
full logits, on raw tensors and through the SFT task on tiny Llama (untied head) and Qwen2 (tied)."""

from __future__ import annotations

import pytest
import torch

from support.text import build_model
from mmtune.data.text_tokens import IGNORE
from mmtune.losses.chunked import linear_token_loss, linear_token_loss_per_row
from mmtune.losses.tokens import token_loss, token_loss_per_row
from mmtune.models.lm_head import split_head
from mmtune.specs import AdapterSpec, ModelSpec
from mmtune.tasks.sft import CausalLMTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _labels(shape, vocab, generator):
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[:, :3] = IGNORE  # a prompt
    labels[0, -4:] = IGNORE  # padding
    return labels


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_plain_loss(with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(50, 16, generator=g).requires_grad_()
    bias = torch.randn(50, generator=g).requires_grad_() if with_bias else None
    labels = _labels((3, 11), 50, g)
    params = [hidden, weight] + ([bias] if with_bias else [])

    plain_total, plain_count = token_loss(torch.nn.functional.linear(hidden, weight, bias), labels)
    plain = torch.autograd.grad(plain_total / plain_count, params)
    total, count = linear_token_loss(hidden, weight, bias, labels, chunk=4)  # several chunks, a ragged last
    chunked = torch.autograd.grad(total / count, params)
    assert int(count) == int(plain_count) == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(total, plain_total, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # per sample, with gradients through the recomputing (checkpointed) path
    row_ids = torch.tensor([[0] * 6 + [1] * 5, [2] * 11, [3] * 7 + [-1] * 4])
    plain_sums, plain_counts = token_loss_per_row(torch.nn.functional.linear(hidden, weight, bias), labels, row_ids, 4)
    sums, counts = linear_token_loss_per_row(hidden, weight, bias, labels, row_ids, 4, chunk=5)
    torch.testing.assert_close(sums, plain_sums, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == plain_counts.tolist()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for a, b in zip(torch.autograd.grad((sums * weights).sum(), params),
                    torch.autograd.grad((plain_sums * weights).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {kind: build_model(kind, root) for kind in ("llama", "qwen2")}


def _grads(task):
    return {n: p.grad.clone() for n, p in task.net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "none"])
def test_sft_task_chunked_loss_equals_the_logits_loss(tiny_lms, kind, method):
    g = torch.Generator().manual_seed(1)
    losses, grads = {}, {}
    for chunked in (False, True):
        torch.manual_seed(0)
        task = CausalLMTask(ModelSpec(name=str(tiny_lms[kind])), AdapterSpec(method=method), chunked_loss=chunked)
        task.configure_model()
        assert (task._split_head() is not None) == chunked
        vocab = task.net.get_output_embeddings().weight.shape[0]
        g.manual_seed(1)
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        labels = _labels((2, 12), vocab, g)
        labels[1, -3:] = IGNORE
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        total, count = task.loss_sums(batch)
        (total / count).backward()
        losses[chunked], grads[chunked] = total.detach(), _grads(task)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-5, msg=name)


def test_models_whose_logits_are_not_a_plain_projection_keep_the_plain_loss():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    assert split_head(Gemma2ForCausalLM(cfg)) is None
    cfg.final_logit_softcapping = None
    assert split_head(Gemma2ForCausalLM(cfg)) is not None


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "blip"])
def test_vlm_chunked_loss_equals_the_logits_loss(family, tmp_path_factory):
    import json

    from mmtune.data.vl_data import VisionTextData, VisualCollate
    from mmtune.tasks.vlm import VisionLanguageTask
    from support.tiny_vlms import caption_rows, tiny_vlm_dir

    root = tmp_path_factory.mktemp("vlm")
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps({"image": str(image), "text": text}) + "\n"
                            for image, text in caption_rows(4, root / "images")))
    model_dir = tiny_vlm_dir(family, tmp_path_factory.getbasetemp() / "vlms")
    results = {}
    for chunked in (False, True):
        torch.manual_seed(0)
        task = VisionLanguageTask(model={"name": str(model_dir)}, adapter={"method": "lora", "r": 8, "alpha": 16},
                                  chunked_loss=chunked)
        dm = VisionTextData(path=str(path), batch_size=4, num_workers=0, prompt="What is shown?")
        dm.setup("fit")
        dm.connect(task.encoding)
        task.configure_model()
        rows = dm._dataset("train")
        batch = VisualCollate(dm.encoding, dm.max_length, with_prompts=True)([rows[i] for i in range(len(rows))])
        total, count = task.loss_sums(batch)
        (total / count).backward()
        results[chunked] = (total.detach(), _grads(task), task._hidden_and_head(batch) is not None)
    assert results[True][2] == (family != "blip") and not results[False][2]  # BLIP's decoder has no split head
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["lora", "none"])
def test_dpo_chunked_log_probabilities_equal_the_logits_ones(tiny_lms, method):
    from mmtune.tasks.dpo import DPOTask

    g = torch.Generator().manual_seed(2)
    results = {}
    for chunked in (False, True):
        torch.manual_seed(0)
        task = DPOTask(ModelSpec(name=str(tiny_lms["llama"])), AdapterSpec(method=method), chunked_loss=chunked)
        task.configure_model()
        with torch.no_grad():  # move the policy off the reference so the preference terms are not trivial
            for p in (p for p in task.net.parameters() if p.requires_grad):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        g.manual_seed(2)
        ids = torch.randint(0, 60, (4, 10), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _labels((4, 10), 60, g)}
        terms = task.loss_terms(batch)
        terms["loss"].backward()
        results[chunked] = ({k: v.detach() for k, v in terms.items()}, _grads(task))
    for key, value in results[False][0].items():
        torch.testing.assert_close(results[True][0][key], value, rtol=1e-5, atol=1e-5, msg=key)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-5, atol=1e-5, msg=name)
