"""The export room: a trained checkpoint -> a deployable file (native safetensors, ONNX, ExecuTorch),
optionally int8, with the preprocessing sidecar (`preprocessing.json`) and a verification report
(`export_report.json`) that compares the exported file, run in its own runtime, with the trained model.

One module per job: `source` (checkpoint + run directory + data), `preprocessing` (the sidecar and a
PIL/numpy preprocessor), `native`, `onnx_format`, `executorch_format`, `quantize`, `runtime` (runs an
exported file), `verify`, `pipeline` (what `mmtune export` calls), `towers` and `tower_export` (image-text and
text-embedding models: one ONNX file per tower, verified on validation pairs with Recall@1) and
`predict` (`mmtune predict --model`).
"""

FORMATS = ("safetensors", "onnx", "executorch")
SIDECAR = "preprocessing.json"
REPORT = "export_report.json"
