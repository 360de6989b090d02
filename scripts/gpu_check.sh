#!/usr/bin/env bash
# The GPU check: one command for a GPU machine with no internet (about 15 minutes of machine time in all).
#
#   bash scripts/gpu_check.sh [OUT_DIR]          on the GPU machine: CUDA tests, then the CUDA benchmark
#   bash scripts/gpu_check.sh --dry [OUT_DIR]    on a CPU: the same steps, small (tests/test_gpu_check.py runs it)
#
# Before a GPU window, on a machine with internet: `bash scripts/gpu_wheels.sh` fills .whl/ with the wheels the
# GPU image lacks (diffusers, torch-fidelity); carry .whl along with the repository. Writes OUT_DIR/gpu_check.log,
# OUT_DIR/pytest.xml, OUT_DIR/bench.json and OUT_DIR/bench_compile.json. Time on one H100, by the limits each
# step runs under: CUDA tests at most 2.8 minutes (about 2.3 expected), benchmark (B and XL at batch 32 in bf16)
# 3.5 (about 2.7), compile (DC-DiT-B through Inductor) 2; about 7 minutes expected once the machine is up, plus its
# start, and at most 8.6 by the limits. Exit code 0 only when every step passed.
set -uo pipefail
MODE=gpu
if [ "${1:-}" = "--dry" ]; then MODE=dry; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
cd "$ROOT"
: > "$LOG"
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
FAILED=()
step() {  # step NAME command...: run, log, time, remember failures; never stop the script
  local name="$1"; shift
  local start=$SECONDS
  say "begin $name: $*"
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "end $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
}

# 1. Wheels the machine lacks, installed beside its own packages (never over them), and the repository itself.
SITE="${TMPDIR:-/tmp}/dcdit-site"
if [ "$MODE" = gpu ] && compgen -G ".whl/*.whl" > /dev/null; then
  step wheels "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no .whl/ folder: using the packages installed (scripts/gpu_wheels.sh prepares the missing ones)"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
step environment "$PY" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')
for name in ('diffusers', 'torch_fidelity', 'accelerate', 'timm', 'flash_attn'):
    try:
        mod = __import__(name); print(name, getattr(mod, '__version__', '?'))
    except ImportError:
        print(name, 'not installed')
from models import attention
print('packed attention kernels: flash-attn varlen', attention.flash_attn_varlen_func is not None,
      '| torch varlen', attention.varlen_attn is not None)
"

# 2. The CUDA tests (tests/test_cuda.py); the dry run points the quick ones at the CPU.
SELECT=()
if [ "$MODE" = dry ]; then
  export DCDIT_GPU_TEST_DEVICE=cpu
  SELECT=(-k "packed_backend or bf16_training or its_batch")
fi
step cuda-tests timeout 170 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py "${SELECT[@]}" \
  --junitxml "$OUT/pytest.xml"

# 3. The benchmark on the device, with the GPU targets' verdicts, as JSON.
# Each step has a time limit, so one hung kernel cannot eat the GPU window.
if [ "$MODE" = dry ]; then
  step bench timeout 300 "$PY" tools/bench.py --tiny --batch 2 --repeats 1 --warmup 0 --device cpu \
    --sections train packed --json "$OUT/bench.json"
else
  step bench timeout 210 "$PY" tools/bench.py --sizes B XL --batch 32 --repeats 3 \
    --sections train sample shares packed memory tf32 adamw plugback elastic lite_cfg --profile-stages dechunk route \
    --json "$OUT/bench.json"
  step bench-compile timeout 120 "$PY" tools/bench.py --sizes B --batch 32 --repeats 3 --sections compile \
    --compile-models dcdit \
    --json "$OUT/bench_compile.json"
fi

if [ ${#FAILED[@]} -eq 0 ]; then
  say "all steps passed; log, pytest.xml and bench.json in $OUT"
  exit 0
fi
say "FAILED: ${FAILED[*]} (see $LOG)"
exit 1
