"""scripts/gpu_check.sh in its dry mode: the GPU check's steps (environment, CUDA tests pointed at the CPU,
the benchmark) run end to end here, so the script cannot rot between GPU windows."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    env.pop("DCDIT_GPU_TEST_DEVICE", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    for step in ("environment", "cuda-tests", "bench"):
        assert f"end {step}: exit 0" in log, step
    assert "all steps passed" in log and "passed" in log and "skipped" not in log.split("cuda-tests")[1][:400]
    assert (out / "pytest.xml").is_file()
    bench = json.loads((out / "bench.json").read_text())
    assert bench, "the benchmark wrote no numbers"
