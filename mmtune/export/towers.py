"""The towers of an image-text or text-embedding model as graphs an exporter can trace, and the
sidecar that makes their files usable without mmtune.

An `image_text_alignment` checkpoint (CLIP, SigLIP, a timm + transformers dual encoder, or a
sentence-transformers text encoder) is two functions, not one: images -> embeddings and texts ->
embeddings. Each becomes its own file (`image_encoder.onnx`, `text_encoder.onnx`) whose output is the
L2-normalised embedding mmtune scores retrieval with, so a search service compares them with a dot
product. The text file takes `input_ids` and `attention_mask` with dynamic batch and sequence length;
the tokenizer files are written beside it (`tokenizer/`, loadable by `tokenizers` or transformers).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IMAGE, TEXT = "image_encoder", "text_encoder"
TOKENIZER_DIR = "tokenizer"
IMAGE_INPUTS, TEXT_INPUTS, OUTPUTS = ("pixels",), ("input_ids", "attention_mask"), ("embeddings",)
MAX_BATCH = 4096
# ExecuTorch plans its memory for the largest shapes: a text tower at batch 4096 x max_length would
# reserve gigabytes, so .pte towers take up to 32 rows a call (the runner splits larger batches)
PTE_MAX_BATCH = 32


class ImageTower(nn.Module):
    """pixels [N, C, H, W] -> L2-normalised embeddings [N, D] (the task's `embed_images`)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.encode_image(pixels), dim=-1)


class TextTower(nn.Module):
    """input_ids, attention_mask [N, L] int64 -> L2-normalised embeddings [N, D] (the task's
    `embed_texts`: pooling over real tokens happens inside the graph)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.encode_text(input_ids, attention_mask), dim=-1)


def has_image_tower(task) -> bool:
    return task.family_name != "sentence_transformers"


def tower_networks(task) -> dict[str, nn.Module]:
    """The towers of the task's network with its adapters merged, eval mode, float32."""
    from mmtune.adapters import merge_adapter

    merged = merge_adapter(copy.deepcopy(task.net)).eval().float()
    towers = {TEXT: TextTower(merged).eval()}
    if has_image_tower(task):
        towers = {IMAGE: ImageTower(merged).eval(), **towers}
    return towers


def text_limits(task) -> tuple[int, bool]:
    """(max_length the task tokenizes to, whether it pads every text to it, as SigLIP does)."""
    tokenize = task.preprocess.text
    return int(tokenize.max_length), bool(tokenize.pad_to_max)


def image_example(input_size, batch: int = 2) -> torch.Tensor:
    from mmtune.export.graph import example_batch

    return example_batch(list(input_size), batch)


def text_example(task) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tokenized texts of different lengths (padded batch), to trace the text tower with; a batch
    of 2 and a length above 1 keep torch.export from fixing either dimension to a constant."""
    enc = task.preprocess.text(["a photo", "a photo of something small and blue"])
    return enc["input_ids"].long(), enc["attention_mask"].long()


def dynamic_shapes(name: str, task, max_batch: int = MAX_BATCH):
    """torch.export dynamic dimensions: batch for both towers, sequence length for text (up to the
    tokenizer's max_length; fixed there when the model pads every text to it)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    if name == IMAGE:
        return ({0: batch},)
    max_length, padded = text_limits(task)
    if padded:
        return ({0: batch}, {0: batch})
    sequence = torch.export.Dim("sequence", min=1, max=max_length)
    return ({0: batch, 1: sequence}, {0: batch, 1: sequence})


def tower_preprocessing(task) -> dict:
    """Per tower what its inputs are made from: the image eval preprocessing (size, crop,
    interpolation, mean/std, as for classifiers) and the text tokenization (files, max_length,
    padding, pooling, normalisation)."""
    from mmtune.export.preprocessing import training_preprocessing

    max_length, padded = text_limits(task)
    pooling = _pooling(task)
    prep = {TEXT: {"tokenizer": f"{TOKENIZER_DIR}/ (tokenizer.json: tokenizers.Tokenizer.from_file, or "
                                f"transformers.AutoTokenizer.from_pretrained)", "max_length": max_length,
                   "truncation": True, "padding": "max_length" if padded else "longest in the batch",
                   "inputs": {"input_ids": "int64 [batch, sequence]",
                              "attention_mask": "int64 [batch, sequence], 1 for real tokens, 0 for padding"},
                   "pooling": pooling, "normalize": "L2 (inside the graph)"}}
    if has_image_tower(task):
        prep[IMAGE] = _image_processor_steps(training_preprocessing(task.preprocess.image_config, None),
                                             getattr(task.export_extra, "image_processor", None))
    return prep


def _image_processor_steps(prep: dict, image_processor) -> dict:
    """CLIP and SigLIP evaluate through their transformers image processor: CLIP resizes the shorter
    side to `size.shortest_edge` and center-crops, SigLIP resizes straight to (H, W) without a crop."""
    if image_processor is None:  # a dual encoder's timm backbone: timm's eval transform, as classifiers
        return prep
    size = image_processor.size
    size = {"height": size, "width": size} if isinstance(size, int) else dict(size)
    c, h, w = prep["input_size"]
    if getattr(image_processor, "do_center_crop", False) and size.get("shortest_edge"):
        prep["resize_shorter_side"] = int(size["shortest_edge"])
    else:
        prep.update(resize_shorter_side=None, resize=[h, w], crop_pct=1.0)
        prep["steps"][1] = "resize to `resize` (H, W), aspect not kept (PIL filter `interpolation`)"
    return prep


def _pooling(task) -> str:
    family = task.family_name
    if family in ("dual_encoder", "sentence_transformers"):
        how = getattr(task._raw(), "pooling", "mean")
        return ("mean over tokens with attention_mask 1" if how == "mean" else "first ([CLS]) token") + \
            (", then a linear projection" if family == "dual_encoder" else "") + " (inside the graph)"
    return f"the {family} text model's own pooling and projection (inside the graph)"


def tower_sidecar(task, files: dict[str, str], quantize: Optional[str]) -> dict:
    """The sidecar of a towers export (the same layout as a classifier's; no classes)."""
    from mmtune.export.preprocessing import build_sidecar

    inputs = {IMAGE: list(IMAGE_INPUTS), TEXT: list(TEXT_INPUTS)}
    towers = {name: {"file": file, "inputs": inputs[name], "outputs": list(OUTPUTS)} for name, file in files.items()}
    decision = {"embeddings": "L2-normalised: score = dot product (cosine similarity)",
                "similarity": "image_encoder(image) . text_encoder(text)" if IMAGE in files
                else "text_encoder(query) . text_encoder(document)"}
    return build_sidecar("image_text_alignment", tower_preprocessing(task), None, decision,
                         sorted({i for t in towers.values() for i in t["inputs"]}), list(OUTPUTS),
                         {"towers": towers, "family": task.family_name, "source_model": task.model_spec.name,
                          "quantize": quantize})


def write_tokenizer(task, out: Path) -> Path:
    """The tokenizer's files in `out/tokenizer/` (tokenizer.json and its configs)."""
    folder = Path(out) / TOKENIZER_DIR
    task.preprocess.text.tokenizer.save_pretrained(str(folder))
    return folder
