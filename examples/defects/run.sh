#!/usr/bin/env bash
# Offline demo: make a synthetic defect data set, convert pretrained EfficientNet-Lite0 weights that ship
# as a pip package, fine-tune with LoRA (`mmtune fit`), then evaluate the best checkpoint (`mmtune test`, which
# also writes the run report, report.html).
set -euo pipefail
cd "$(dirname "$0")/../.."
python tools/make_defect_data.py --out data/defects --per-class 100 --size 64 --lots 20
[ -f data/models/efficientnet_lite0/config.json ] || python tools/convert_efficientnet_lite.py --out data/models/efficientnet_lite0
mmtune fit --config configs/examples/defects_demo.yaml "$@"
mmtune test --config configs/examples/defects_demo.yaml --ckpt_path best "$@"
run=$(ls -d runs/defects_demo/version_* | sort -V | tail -n 1)
echo
echo "Run directory: $run (config.yaml, metrics.csv, TensorBoard logs, checkpoints/, metrics.json)"
echo "Confusion matrix: $run/confusion_matrix.png"
echo "Run report: $run/report.html (open it in a browser; rebuild with: mmtune report $run)"
python - "$run" <<'PY'
import json, sys
test = json.load(open(f"{sys.argv[1]}/metrics.json"))["test"]["metrics"]
print("Test: " + ", ".join(f"{k.split('/')[1]} {test[k]:.3f}" for k in ("test/accuracy", "test/f1_macro", "test/auroc_macro")))
PY
