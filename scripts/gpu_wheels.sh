#!/usr/bin/env bash
# Run on a machine with internet, before a GPU window: download into .whl/ the wheels that the GPU machines'
# image lacks (Python 3.12, torch 2.11, no internet there). scripts/gpu_check.sh installs them from .whl/.
# The image already has torch, timm, accelerate, pyyaml, pytest, scipy, matplotlib, huggingface-hub,
# safetensors, regex, tensorboard; these are the pins of requirements.txt that it lacks, plus their own needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(diffusers==0.42.1 torch-fidelity==0.4.0 importlib-metadata==10.2.0 lazy-importer==0.1.0)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
du -sh .whl
ls .whl
