#!/usr/bin/env bash
# Offline report-generation example: synthetic two-view chest studies with reports (PII in the headers, a
# corrupt image, a study without a report) -> `mmtune data align` (join by study, scrub PII, split by
# patient) -> `mmtune fit` a tiny Qwen2-VL -> `mmtune test` (BLEU-4, ROUGE-L, chrF, predictions.jsonl)
# -> `mmtune export` (merged weights + processor, loadable by plain transformers).
set -euo pipefail
cd "$(dirname "$0")/../.."
python tools/make_report_data.py --out data/reports --studies 80 --patients 25
python tools/make_tiny_vlm.py --family qwen2_vl --out data/models
rm -rf data/reports/aligned
mmtune data align --config configs/data/reports_demo.yaml
mmtune fit --config configs/examples/reports_demo.yaml "$@"
mmtune test --config configs/examples/reports_demo.yaml --ckpt_path best "$@"
run=$(ls -d runs/reports_demo/version_* | sort -V | tail -n 1)
mmtune export --ckpt_path "$run/checkpoints/best.ckpt" --out "$run/exported"
python - "$run" <<'PY'
import json, sys
run = sys.argv[1]
test = json.load(open(f"{run}/metrics.json"))["test"]["metrics"]
print("Test: " + ", ".join(f"{k.split('/')[1]} {test[k]:.3f}" for k in ("test/loss", "test/bleu4", "test/rougeL", "test/chrf")))
row = json.loads(open(f"{run}/predictions.jsonl").readline())
print(f"Example ({row['id']}):\n  reference:  {row['reference']!r}\n  prediction: {row['prediction']!r}")
print(f"Exported model and processor: {run}/exported")
PY
