"""Export of adapters that cannot be merged into the base weights (prefix and prompt tuning).

Prefix tuning adds trained keys and values to every attention layer and prompt tuning adds trained input
embeddings: neither is a change of a weight matrix, so there is nothing to fold into the base. Such a
run exports the peft adapter (`adapter_config.json` + `adapter_model.safetensors`, loadable by peft's
`AutoPeftModel*` classes on top of the base model) with a note saying how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

LOADING_NOTE = """# Loading this export

`{method}` tuning adds {what} rather than changing weights, so it cannot be merged into the base
model: this folder holds the peft adapter (`adapter_config.json`, `adapter_model.safetensors`) and the
{processor}. The base model is `{base}` (`base_model_name_or_path` in `adapter_config.json`; edit it
if the base lives elsewhere on this machine).

```python
from peft import {peft_class}
from transformers import {processor_class}

model = {peft_class}.from_pretrained("{out}")   # loads the base, then the adapter
{processor_var} = {processor_class}.from_pretrained("{out}")
```

Serving engines that take a merged checkpoint cannot run it; vLLM and TGI load LoRA-style adapters only.
"""

WHAT = {"prefix": "trained key/value prefixes to every attention layer", "prompt": "trained virtual input tokens"}


def export_unmerged(net: nn.Module, out: Path, method: str, base: str, task: str, processor, peft_class: str,
                    processor_class: str) -> Path:
    """Writes the peft adapter of `net`, `processor` and `LOADING.md` into `out`, plus `mmtune.json`
    saying what the folder holds.

    Args:
        net: the trained `peft.PeftModel`.
        out: the export folder.
        method: `prefix` or `prompt`.
        base: the base model's name or path as the user gave it (`model.name`).
        task: the task's registry name, recorded in `mmtune.json`.
        processor: the tokenizer or processor to save beside the adapter.
        peft_class, processor_class: the classes named in the loading note.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    processor_var = "tokenizer" if "Tokenizer" in processor_class else "processor"
    (out / "LOADING.md").write_text(LOADING_NOTE.format(
        method=method, what=WHAT[method], processor=processor_var, base=base, peft_class=peft_class,
        processor_class=processor_class, processor_var=processor_var, out=out))
    (out / "mmtune.json").write_text(json.dumps({"task": task, "source_model": base, "format": "peft_adapter",
                                                 "adapter": method, "merged": False}, indent=2))
    return out
