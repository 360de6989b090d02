#!/usr/bin/env bash
# The README's demo command: set up .venv if needed, train DC-DiT on the bundled MNIST digits on the CPU,
# then sample a class grid and the chunking visualisation into demo/.
# Extra arguments go to train.py as overrides, e.g. `bash scripts/demo.sh train.max_steps=3000`.
source "$(dirname "$0")/env.sh"
CONFIG="${DEMO_CONFIG:-configs/tiny/dcdit-digits.yaml}"
OUT=demo
mkdir -p "$OUT"
start=$(date +%s)
python train.py --config "$CONFIG" train.results_dir="$OUT/runs" train.log_every=100 "$@"
run=$(ls -d "$OUT"/runs/*/ | sort | tail -n 1)
ckpt=$(ls "$run"checkpoints/*.pt | sort | tail -n 1)
python sample.py --ckpt "$ckpt" --out-dir "$OUT"
echo "demo done in $(( $(date +%s) - start )) s: $OUT/sample.png, $OUT/chunking_viz.png (run folder $run)"
