"""Image + question prompts for reinforcement fine-tuning of vision-language models (`VisionGRPOTask`).

The rows are those of `VisionTextData` (VQA, caption or chat files, the same readers, splits, checks
and skips): the last assistant turn is not trained on but is the reference the rewards check, as the
row's `answer` column (the first accepted answer; all of them as `answers`). A batch carries the
prepared samples and their decoded images rather than processor outputs: the task encodes each prompt
once per sampled completion, which every family's processor does correctly, where repeating
processor outputs row by row does not (Qwen2-VL packs the patches of all images into one tensor).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from mmtune.data.samplers import EpochSampler, ResumableLoader
from mmtune.data.vl_data import VisionTextData
from mmtune.data.vl_encoding import Prepared


def prompt_columns(item: Prepared) -> dict:
    """The columns a reward reads for one prompt: the reference answer, all accepted answers, the
    answer type and the row's other columns."""
    s = item.sample
    return {**s.meta, "answer": s.reference, "answers": list(s.answers),
            **({"answer_type": s.answer_type} if s.answer_type else {})}


class VisualPromptCollate:
    """Prompts with their images, turns (without the reply) and reward columns."""

    def __call__(self, rows: list[tuple[int, Prepared, list]]) -> dict:
        items = [r[1] for r in rows]
        return {"items": items, "images": [r[2] for r in rows], "origins": [it.sample.id for it in items],
                "messages": [it.sample.messages[:-1] for it in items], "meta": [prompt_columns(it) for it in items]}


class VisionPromptData(VisionTextData):
    """`VisionTextData` read as prompts for `VisionGRPOTask` (arguments as there; `max_length` is not
    applied: a prompt is never cut)."""

    def _loader(self, split: str, batch_size: int, with_prompts: bool, **kwargs) -> DataLoader:
        loader = ResumableLoader if isinstance(kwargs.get("sampler"), EpochSampler) else DataLoader
        return loader(self._dataset(split), batch_size=batch_size, num_workers=self.num_workers,
                      collate_fn=VisualPromptCollate(), persistent_workers=self.num_workers > 0, **kwargs)
