"""Export of adapters that cannot be merged into the base weights (prefix and prompt tuning).

Prefix tuning adds trained keys and values to every attention layer and prompt tuning adds trained input
embeddings: neither is a change of a weight matrix, so there is nothing to fold into the base. Such a
run exports the peft adapter (`adapter_config.json` + `adapter_model.safetensors`, loaded with peft's
`PeftModel.from_pretrained` on top of the base model) with a note saying how.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from torch import nn

LOADING_NOTE = """# Loading this export

`{method}` tuning adds {what} rather than changing weights, so it cannot be merged into the base
model: this folder holds the peft adapter (`adapter_config.json`, `adapter_model.safetensors`) and the
{processor_var}. The base model is `{base}` (also `base_model_name_or_path` in `adapter_config.json`;
change it there if the base lives elsewhere on this machine).

```python
from peft import PeftModel
from transformers import {base_class}, {processor_class}

base = {base_class}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{out}")   # the base, plus the trained virtual tokens
{processor_var} = {processor_class}.from_pretrained("{out}")
```

`model.generate(...)` prepends the virtual tokens itself. Serving engines that take merged checkpoints
cannot run it (vLLM and TGI load LoRA-style adapters only).
"""

WHAT = {"prefix": "trained key/value prefixes to every attention layer", "prompt": "trained virtual input tokens"}


def export_unmerged(net: nn.Module, out: Path, method: str, base: str, task: str, processor, base_class: str,
                    processor_class: str, save_base: Optional[Callable[[Path], None]] = None) -> Path:
    """Writes the peft adapter of `net`, `processor` and `LOADING.md` into `out`, plus `mmtune.json`
    saying what the folder holds.

    Args:
        net: the trained `peft.PeftModel`.
        out: the export folder.
        method: `prefix` or `prompt`.
        base: the base model's name or path as the user gave it (`model.name`).
        task: the task's registry name, recorded in `mmtune.json`.
        processor: the tokenizer or processor to save beside the adapter.
        base_class, processor_class: the transformers classes that load the base and the processor.
        save_base: writes the base model into a folder; given when parts of the base trained in full
            (a VLM's projector), whose weights the adapter does not hold: the base is then saved in
            `out/base` and the note loads it from there.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if save_base is not None:
        save_base(out / "base")
        base = str(out / "base")
    net.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    processor_var = "tokenizer" if "Tokenizer" in processor_class else "processor"
    (out / "LOADING.md").write_text(LOADING_NOTE.format(
        method=method, what=WHAT[method], base=base, base_class=base_class, processor_class=processor_class,
        processor_var=processor_var, out=out))
    (out / "mmtune.json").write_text(json.dumps({"task": task, "source_model": base, "format": "peft_adapter",
                                                 "adapter": method, "merged": False}, indent=2))
    return out
