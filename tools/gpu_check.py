#!/usr/bin/env python
"""One prepared GPU check: mmtune's speed and memory at real model sizes, against the plain PyTorch
loop and TRL, in one table (about 5-8 minutes on one H100/H200; every model built from a config, no hub).

Rows:
* `vit_lora`, `vit_full`: ViT-B/16 at 224 px, bf16 autocast, images/s of mmtune's classification task
  against the plain loop of `tools/bench_overhead.py` on the same model and batches (target >= 0.97).
* `llm_lora`: LoRA SFT (r 16, all linear layers) of a ~1.1B Llama-shaped model (TinyLlama's shape),
  packed, bf16, tokens/s and MFU against TRL's SFTTrainer on the same settings (`tools/bench_sft.py`'s
  runners; targets >= 1.3x TRL, >= 45% MFU on an H100/H200).
* `llm_qlora`: the same model 4-bit NF4 (bitsandbytes) + LoRA through mmtune.
* `vlm_lora`: a ~2B Qwen2-VL-shaped model (Qwen2-VL-2B's config), LoRA on the language model, one
  image of 448 px per sample: step time.
Each row reports the peak `torch.cuda.max_memory_allocated` (peak RSS on CPU). Each row runs in its
own process (`--tiny` runs them in this one, for the test suite).

MFU = tokens/s x model FLOPs per token / the GPU's peak dense bf16 FLOP/s (`PEAK_BF16`, by device
name). FLOPs per token follow the PaLM convention: 6 x (non-embedding weights + output head) plus the
attention matmuls 12 x layers x hidden x sequence length; LoRA's backward skips the frozen weights'
gradients, so the work actually done is about 2/3 of that (MFU here is the usual, comparable figure).

    python tools/gpu_check.py                       # on a GPU
    python tools/gpu_check.py --device cpu --tiny   # tiny models, seconds: keeps the script from rotting
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULT_MARK = "GPU_CHECK_ROW "
ROWS = ("vit_lora", "vit_full", "llm_lora", "llm_qlora", "vlm_lora")
# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048)


def peak_flops(device_name: str):
    for key, value in PEAK_BF16.items():  # longest names first where they share a prefix (H100 PCIe)
        if key in device_name:
            return value
    return None


def flops_per_token(config, seq: int) -> float:
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    return 6 * (layers * per_layer + h * vocab) + 12 * layers * h * seq


def _peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    from bench_sft import rss_mb

    return rss_mb()


def row_vit(adapter: str, args) -> dict:
    import bench_overhead as bo

    model, size, batch, steps = (("timm:vit_tiny_patch16_224", 32, 4, 3) if args.tiny else
                                 ("timm:vit_base_patch16_224", 224, 64, 40))
    root = Path(tempfile.mkdtemp())
    manifest = str(bo.make_data(root, per_class=8 if args.tiny else 64, size=size, seed=0))
    cfg = dict(manifest=manifest, steps=steps, warmup=1 if args.tiny else 10, batch_size=batch, image_size=size,
               workers=0 if args.tiny else 4, threads=args.threads, lora_r=8, device=args.device, seed=0,
               precision="bf16-mixed" if args.device == "cuda" else "32-true", adapter=adapter, model=model)
    out = {}
    for runner in ("plain", "mmtune"):
        _reset(args.device)
        res = (bo.run_mmtune if runner == "mmtune" else bo.run_plain)(dict(cfg, runner=runner))
        out[runner] = {"images_per_s": res["images_per_s"], "memory_mb": _peak_memory_mb(args.device)}
    return {"row": f"vit_{adapter}", "model": model.removeprefix("timm:"), "mmtune": out["mmtune"]["images_per_s"],
            "peer": out["plain"]["images_per_s"], "unit": "images/s", "ratio": out["mmtune"]["images_per_s"] /
            out["plain"]["images_per_s"], "target": ">= 0.97 x plain", "memory_mb": out["mmtune"]["memory_mb"],
            "peer_memory_mb": out["plain"]["memory_mb"]}


def _llm_args(args, quantization="none"):
    return argparse.Namespace(steps=3 if args.tiny else 30, batch_size=2 if args.tiny else 8,
                              max_length=64 if args.tiny else 1024, lr=2e-4, schedule="constant", seed=0,
                              device=args.device, precision="bf16" if args.device == "cuda" else "32",
                              quantization=quantization)


def _llm_model(args) -> str:
    from bench_sft import tiny_model

    root = Path(args.work) / ("llm_tiny" if args.tiny else "llm_1b")
    if not (root / "llm" / "config.json").exists():
        tiny_model(root, layers=2 if args.tiny else 22, name="llm", shape=None if args.tiny else LLAMA_1B)
    return str(root / "llm")


def _train_file(args, rows: int) -> tuple[Path, list]:
    from bench_sft import make_rows

    data = make_rows(rows, 0) * (1 if args.tiny else 20)  # long enough to fill packed rows of 1024 tokens
    path = Path(args.work) / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path, data


def row_llm(args, quantization: str = "none") -> dict:
    import bench_sft
    from transformers import AutoConfig

    model = _llm_model(args)
    a = _llm_args(args, quantization)
    train, rows = _train_file(args, 400)
    val = bench_sft.make_rows(4, 1)
    _reset(args.device)
    mm = bench_sft.run_mmtune(model, train, val, a, True)
    mm_mem = _peak_memory_mb(args.device)
    cfg = AutoConfig.from_pretrained(model)
    flops = flops_per_token(cfg, a.max_length)
    peak = peak_flops(_device_name(args.device))
    result = {"row": "llm_qlora" if quantization != "none" else "llm_lora",
              "model": f"Llama {cfg.num_hidden_layers}x{cfg.hidden_size}", "mmtune": mm["tokens_per_s"],
              "unit": "tokens/s", "memory_mb": mm_mem,
              "mfu": mm["tokens_per_s"] * flops / peak if peak else None}
    if quantization == "none":
        _reset(args.device)
        trl = bench_sft.run_trl(model, rows, val, a, True)
        result.update(peer=trl["tokens_per_s"], ratio=mm["tokens_per_s"] / trl["tokens_per_s"],
                      peer_memory_mb=_peak_memory_mb(args.device), target=">= 1.3 x TRL, MFU >= 45%")
    return result


def row_vlm(args) -> dict:
    """A LoRA step of a Qwen2-VL-shaped model on synthetic image + text batches (mmtune's adapter
    injection and chunked loss; no processor is needed: the image tokens are laid out here)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mmtune.adapters import apply_adapter
    from mmtune.losses.chunked import linear_token_loss
    from mmtune.models.lm_head import hidden_states, split_head
    from mmtune.models.vlm import vlm_parts
    from mmtune.specs import AdapterSpec

    if args.tiny:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        image, batch, seq_text, steps = 56, 2, 16, 3
    else:  # Qwen2-VL-2B
        text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936,
                    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        image, batch, seq_text, steps = 448, 4, 256, 10
    image_id, start_id, end_id = text["vocab_size"] - 3, text["vocab_size"] - 2, text["vocab_size"] - 1
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image_id, video_token_id=image_id - 1,
                           vision_start_token_id=start_id, vision_end_token_id=end_id, tie_word_embeddings=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    net = Qwen2VLForConditionalGeneration(config).to(device, dtype)
    net.config.use_cache = False
    parts = vlm_parts(net)
    policies = {"vision": "frozen", "projector": "full", "language": "adapter", "embeddings": "frozen", "head": "frozen"}
    net, report = apply_adapter(net, AdapterSpec(method="lora", r=16, alpha=32), "hf", parts,
                                {p: policies[p] for p in parts})
    grid = image // 14
    n_image = (grid // 2) ** 2
    ids = torch.randint(0, image_id - 2, (batch, seq_text + n_image + 2), device=device)
    ids[:, 0], ids[:, n_image + 1] = start_id, end_id
    ids[:, 1:n_image + 1] = image_id
    labels = ids.clone()
    labels[:, :n_image + 2] = -100
    patches = torch.randn(batch * grid * grid, 3 * 2 * 14 * 14, device=device, dtype=dtype)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": patches,
              "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, device=device),
              "mm_token_type_ids": (ids == image_id).long()}  # 1 at image tokens, as the processor returns
    split = split_head(net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    _reset(args.device)
    times = []
    for step in range(steps):
        _sync(args.device)
        t0 = time.perf_counter()
        total, count = linear_token_loss(hidden_states(split, inputs), split.head.weight, split.head.bias, labels)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    params = sum(p.numel() for p in net.parameters())
    return {"row": "vlm_lora", "model": f"Qwen2-VL {params / 1e9:.2f}B" if params >= 1e8 else f"Qwen2-VL {params / 1e6:.1f}M", "mmtune": 1000 * step_s,
            "unit": f"ms/step (batch {batch}, {image} px)", "memory_mb": _peak_memory_mb(args.device)}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        from bench_sft import reset_peak_rss

        reset_peak_rss()


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"


def run_row(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if name.startswith("vit_"):
        return row_vit(name.removeprefix("vit_"), args)
    if name == "llm_lora":
        return row_llm(args)
    if name == "llm_qlora":
        return row_llm(args, "nf4")
    return row_vlm(args)


def table(results: list[dict], device_name: str) -> str:
    lines = [f"GPU check on {device_name}", "",
             "| row | model | mmtune | unit | peer | mmtune/peer | MFU | peak memory MB (peer) | target |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | | | | | | |")
            continue
        peer = f"{r['peer']:.1f}" if r.get("peer") else "-"
        ratio = f"**{r['ratio']:.2f}**" if r.get("ratio") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = f"{r['memory_mb']:.0f}" + (f" ({r['peer_memory_mb']:.0f})" if r.get("peer_memory_mb") else "")
        lines.append(f"| {r['row']} | {r['model']} | {r['mmtune']:.1f} | {r['unit']} | {peer} | {ratio} | {mfu} | {mem} "
                     f"| {r.get('target', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models, a few steps, in this process (CI)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--threads", type=int, default=1 if "--tiny" in (argv or sys.argv) else os.cpu_count())
    parser.add_argument("--work", default=None, help="where models and data are written (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = args.work or tempfile.mkdtemp(prefix="mmtune-gpu-check-")
    if args.row:
        print(RESULT_MARK + json.dumps(run_row(args.row, args)), flush=True)
        return []
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU (use --device cpu --tiny for the smoke run)")
    results = []
    for name in args.rows:
        started = time.perf_counter()
        if args.tiny:
            result = run_row(name, args)
        else:
            cmd = [sys.executable, __file__, "--row", name, "--device", args.device, "--threads", str(args.threads),
                   "--work", args.work]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARK)]
            result = json.loads(lines[-1][len(RESULT_MARK):]) if lines else \
                {"row": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]}
        result["seconds"] = time.perf_counter() - started
        print(f"[gpu_check] {name}: {json.dumps(result)}", flush=True)
        results.append(result)
    report = table(results, _device_name(args.device))
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return results


if __name__ == "__main__":
    main()
