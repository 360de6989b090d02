"""train.py end to end on CPU: exact resume, 2-process data parallel, checkpoints, config in the run, stop signals
and the one-trainer-per-folder lock."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, only_run, run_losses, run_script, train_full_and_resumed
from fileio import hold_folder


def test_resume_repeats_the_uninterrupted_losses(feature_dir, tmp_path):
    common = ["--config", "configs/tiny/test-dcdit.yaml", f"data.feature_path={feature_dir}", "train.log_every=1",
              "train.ckpt_every=10"]
    full, resumed, run_b = train_full_and_resumed(common, 20, 10, tmp_path)
    assert sorted(full) == list(range(1, 21)) and set(range(11, 21)) <= set(resumed)
    for step in range(11, 21):
        assert resumed[step] == full[step], (step, resumed[step], full[step])
    assert full[11] != full[12]  # the comparison is not between constants
    # Checkpoints hold plain tensors and values only, and the resolved config.
    ck = torch.load(os.path.join(run_b, "checkpoints", "0000020.pt"), weights_only=True)
    assert ck["step"] == 20 and ck["config"]["model"]["name"] == "DCDiT-S"
    assert set(ck) >= {"model", "ema", "opt", "config", "step", "rng"}
    assert os.path.isfile(os.path.join(run_b, "config.yaml"))
    assert not glob.glob(os.path.join(run_b, "checkpoints", "*.tmp*"))


def test_two_cpu_processes_train_data_parallel_in_sync(feature_dir, tmp_path):
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
                       "train.py", "--config", "configs/tiny/test-dcdit.yaml", f"data.feature_path={feature_dir}",
                       "train.max_steps=4", "train.ckpt_every=2", "train.log_every=2",
                       f"train.results_dir={tmp_path}"])
    run = only_run(tmp_path)
    log = open(os.path.join(run, "log.txt")).read()
    assert "2 process(es)" in log and "micro-batch 4 x accum 1 x world 2 = global 8" in log
    assert "step 4: all 2 ranks hold identical weights" in log, proc.stdout[-2000:]


def test_bad_batch_split_is_a_one_line_error(feature_dir, tmp_path):
    proc = run_script(["train.py", "--config", "configs/tiny/test-dit.yaml", f"data.feature_path={feature_dir}",
                       "train.global_batch_size=9", "train.grad_accum_steps=2", f"train.results_dir={tmp_path}"],
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_dcdit_on_digits_learns_to_compress_toward_n(tmp_path):
    """Paper §3.5 in miniature: from a fresh router (keeps ~2 of 256 tokens) the ratio loss pulls the
    compression toward N = 4 while the diffusion loss falls."""
    run_script(["train.py", "--config", "configs/tiny/dcdit-digits.yaml", "train.max_steps=360",
                "train.global_batch_size=32", "train.log_every=40", "train.ckpt_every=1000",
                "model.depth=2", "model.hidden_size=64", "model.encoder_width=16",
                f"train.results_dir={tmp_path}"], timeout=600)
    recs = [json.loads(line.split("] ", 1)[1]) for line in open(os.path.join(only_run(tmp_path), "log.txt"))
            if '"step"' in line]
    assert recs[-1]["step"] == 360
    assert recs[-1]["diffusion_loss"] < 0.2 * recs[0]["diffusion_loss"], (recs[0], recs[-1])

    def distance_to_n(rec):  # |log(compression / N)|, N = 4
        return abs(math.log(rec["compression_gmean"] / 4.0))

    early = (distance_to_n(recs[0]) + distance_to_n(recs[1])) / 2
    late = (distance_to_n(recs[-2]) + distance_to_n(recs[-1])) / 2
    assert late < 0.5 * early and late < math.log(1.5), [r["compression_gmean"] for r in recs]


def test_multi_budget_fraction_is_a_function_of_the_step():
    import train
    from config import load_config
    cfg = load_config("configs/tiny/test-dcdit.yaml", ["train.multi_budget=true", "train.multi_budget_start_step=5",
                                                       "train.multi_budget_drop_fractions=[0.0,0.2,0.4,0.6]"])
    assert [train.multi_budget_fraction(cfg, s) for s in range(5)] == [0.0] * 5  # before the start step
    draws = [train.multi_budget_fraction(cfg, s) for s in range(5, 405)]
    assert set(draws) == {0.0, 0.2, 0.4, 0.6}  # every budget is used
    assert draws == [train.multi_budget_fraction(cfg, s) for s in range(5, 405)]  # same on every rank / resume
    counts = [draws.count(f) for f in (0.0, 0.2, 0.4, 0.6)]
    assert min(counts) > 60  # roughly uniform over 400 steps
    off = load_config("configs/tiny/test-dcdit.yaml", ["train.multi_budget_start_step=5"])
    assert all(train.multi_budget_fraction(off, s) == 0.0 for s in range(0, 1000, 37))


def test_multi_budget_starts_when_the_n_ramp_ends_unless_set():
    """The release's rule: an unset start step means the end of the N curriculum (step 0 without one)."""
    import train
    from config import load_config
    ramp = load_config("configs/tiny/test-dcdit.yaml", ["train.multi_budget=true", "train.ratio_ramp_steps=30",
                                                        "train.multi_budget_drop_fractions=[0.5]"])
    assert train.multi_budget_start(ramp) == 30
    assert [train.multi_budget_fraction(ramp, s) for s in (0, 29, 30, 31)] == [0.0, 0.0, 0.5, 0.5]
    no_ramp = load_config("configs/tiny/test-dcdit.yaml", ["train.multi_budget=true",
                                                           "train.multi_budget_drop_fractions=[0.5]"])
    assert train.multi_budget_fraction(no_ramp, 0) == 0.5


def test_ratio_target_ramp():
    import train
    from config import load_config
    cfg = load_config("configs/tiny/test-dcdit.yaml", ["train.ratio_ramp_steps=100", "train.ratio_ramp_start=2.0",
                                                       "model.downsample_factor=4.0"])
    assert train.ratio_target(cfg, 0) == 2.0 and train.ratio_target(cfg, 50) == 3.0
    assert train.ratio_target(cfg, 100) == 4.0 and train.ratio_target(cfg, 1000) == 4.0


def test_update_ema_is_decay_times_old_plus_one_minus_decay_times_new():
    """ema <- decay * ema + (1 - decay) * model, exactly; a frozen parameter of the model is never averaged."""
    import train
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[4.0, -2.0]]))
        model.bias.fill_(10.0)
        ema.weight.copy_(torch.tensor([[2.0, 6.0]]))
        ema.bias.fill_(1.0)
    model.bias.requires_grad_(False)
    train.update_ema(ema, model, 0.5)
    assert ema.weight.tolist() == [[3.0, 2.0]]        # 0.5 * (2, 6) + 0.5 * (4, -2)
    assert ema.bias.tolist() == [1.0]                 # frozen in the model: the EMA keeps its own value
    train.update_ema(ema, model, 0.75)
    assert ema.weight.tolist() == [[3.25, 1.0]]       # 0.75 * (3, 2) + 0.25 * (4, -2)


def _train_two_steps(feature_dir, results, decay):
    """A 2-step tiny DC-DiT run with train.ema_decay=decay -> (its final checkpoint, the run's config)."""
    from config import load_config
    run_script(["train.py", "--config", "configs/tiny/test-dcdit.yaml", f"data.feature_path={feature_dir}",
                "train.max_steps=2", "train.log_every=2", f"train.ema_decay={decay}", f"train.results_dir={results}"])
    run = only_run(results)
    ck = torch.load(os.path.join(run, "checkpoints", "0000002.pt"), weights_only=True)
    return ck, load_config(os.path.join(run, "config.yaml"))


def test_ema_decay_zero_makes_the_ema_the_trained_weights(feature_dir, tmp_path):
    """train.ema_decay is the decay train.py applies: at 0 the saved EMA is exactly the model."""
    ck, _ = _train_two_steps(feature_dir, tmp_path, 0.0)
    assert ck["ema"].keys() == ck["model"].keys()
    for key, value in ck["model"].items():
        assert torch.equal(ck["ema"][key], value), key


def test_ema_decay_one_keeps_the_initial_weights(feature_dir, tmp_path):
    """At decay 1 the saved EMA is the initial model: train.py seeds torch with train.seed and builds the model
    before anything else draws, so a model built the same way here is that reference."""
    from models import create_model
    ck, cfg = _train_two_steps(feature_dir, tmp_path, 1.0)
    torch.manual_seed(cfg.train.seed)
    init = create_model(cfg.model, cfg.dydit).state_dict()
    assert ck["ema"].keys() == init.keys()
    for key, value in init.items():
        assert torch.equal(ck["ema"][key], value), key
    moved = [k for k, v in init.items() if not torch.equal(ck["model"][k], v)]
    assert len(moved) > len(init) // 2, moved  # training did change the weights the EMA ignored


def test_tracking_profiling_images_and_wandb_resume(feature_dir, tiny_vae, tmp_path):
    """One short run with every reporting option on, resumed halfway: the resumed run continues the same W&B run
    (offline mode; its id is in the checkpoint), the profiler writes a trace of the chosen steps, images and
    TensorBoard events appear, and the log carries grad norm, compression as run and the mean drop fraction."""
    import glob as _glob
    common = ["--config", "configs/tiny/test-dcdit.yaml", f"data.feature_path={feature_dir}", "train.log_every=1",
              "train.ckpt_every=2", "logging.wandb=offline", "logging.tensorboard=true", "logging.image_every=2",
              "train.profile_steps=[2,3]", "train.multi_budget=true", "train.multi_budget_start_step=0",
              "train.multi_budget_drop_fractions=[0.5]", "sample.num_sampling_steps=2", f"data.vae_path={tiny_vae}"]
    env = {"WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    run_script(["train.py", *common, "train.max_steps=2", f"train.results_dir={tmp_path}"], env=env)
    run = only_run(tmp_path)
    run_script(["train.py", "--resume", run, "train.max_steps=4"], env=env)
    first = torch.load(os.path.join(run, "checkpoints", "0000002.pt"), weights_only=True)["wandb_id"]
    again = torch.load(os.path.join(run, "checkpoints", "0000004.pt"), weights_only=True)["wandb_id"]
    assert first and again == first
    offline = _glob.glob(os.path.join(run, "wandb", "offline-run-*"))
    assert len(offline) == 2 and all(d.endswith(first) for d in offline), offline
    assert _glob.glob(os.path.join(run, "profile", "*.pt.trace.json"))
    for step in (2, 4):
        assert os.path.isfile(os.path.join(run, f"samples_{step:07d}.png"))
        assert os.path.isfile(os.path.join(run, f"chunking_{step:07d}.png"))
    assert _glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))
    recs = [json.loads(line.split("] ", 1)[1]) for line in open(os.path.join(run, "log.txt")) if '"step"' in line]
    last = recs[-1]
    assert last["grad_norm"] > 0 and last["tail_drop"] == 0.5
    # Half the boundaries dropped: the blocks ran on about half the kept tokens, so compression doubles.
    assert last["compression_run_gmean"] > 1.5 * last["compression_gmean"]


def test_init_from_starts_a_new_run_from_checkpoint_weights(feature_dir, tmp_path):
    """train.init_from: the new run's step 0 weights are the checkpoint's (EMA by default), the optimizer is fresh."""
    common = ["--config", "configs/tiny/test-dcdit.yaml", f"data.feature_path={feature_dir}"]
    run_script(["train.py", *common, "train.max_steps=2", "train.ckpt_every=2", f"train.results_dir={tmp_path / 'a'}"])
    source = os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000002.pt")
    run_script(["train.py", *common, "train.max_steps=1", "train.ckpt_every=1", "train.ema_decay=1",
                f"train.init_from={source}", f"train.results_dir={tmp_path / 'b'}"])
    src = torch.load(source, weights_only=True)
    new = torch.load(os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000001.pt"), weights_only=True)
    assert new["step"] == 1 and len(new["opt"]["state"]) > 0
    # ema_decay 1 keeps the EMA at the starting weights: exactly the source's EMA.
    assert all(torch.equal(new["ema"][k], v) for k, v in src["ema"].items())
    assert not all(torch.equal(new["model"][k], v) for k, v in src["ema"].items())  # and it did train


def test_a_non_default_scaffold_trains_and_resumes_exactly(feature_dir, tmp_path):
    """model.encoder_layout / decoder_layout with DiT blocks in the scaffold: resume repeats the losses."""
    common = ["--config", "configs/tiny/test-dcdit.yaml", f"data.feature_path={feature_dir}", "train.log_every=1",
              "train.ckpt_every=2", "model.encoder_layout=c1D1", "model.decoder_layout=d1c2"]
    full, resumed, run_b = train_full_and_resumed(common, 4, 2, tmp_path)
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]
    ck = torch.load(os.path.join(run_b, "checkpoints", "0000004.pt"), weights_only=True)
    assert any(k.startswith("encoder.blocks.1.block.attn") for k in ck["model"])


def test_train_tf32_sets_the_matmul_flag_and_defaults_off():
    import train
    from config import TrainConfig
    assert TrainConfig().tf32 is False  # the authors' training script leaves TF32 off
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for enabled in (True, False):
            train.use_tf32_matmuls(enabled)
            assert torch.backends.cuda.matmul.allow_tf32 is enabled
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_a_run_folder_another_process_trains_is_refused(feature_dir, tmp_path):
    """Two trainers on one run folder would overwrite each other's checkpoints: the second stops before it writes."""
    common = [f"data.feature_path={feature_dir}", "train.ckpt_every=2", "train.log_every=1"]
    run_script(["train.py", "--config", "configs/tiny/test-dit.yaml", *common, "train.max_steps=2",
                f"train.results_dir={tmp_path}"])
    run = only_run(tmp_path)
    log = open(os.path.join(run, "log.txt")).read()
    held = hold_folder(run, "run folder")  # as a trainer of this folder would
    resume = ["train.py", "--config", "configs/tiny/test-dit.yaml", "--resume", run, *common, "train.max_steps=4"]
    proc = run_script(resume, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: run folder {run} is in use by another process "
                                                f"(pid {os.getpid()}); stop it or wait for it to finish before "
                                                "starting another here"]
    assert open(os.path.join(run, "log.txt")).read() == log  # nothing appended
    held.close()
    run_script(resume)
    assert os.path.isfile(os.path.join(run, "checkpoints", "0000004.pt"))


def test_a_stop_signal_saves_the_step_it_is_on_and_resume_continues_exactly(feature_dir, tmp_path):
    """SIGTERM to the whole process group (as SLURM or a terminal sends it), DataLoader workers included, between
    checkpoints: the run saves the step it was on, exits 143, and a resume from there repeats the uninterrupted
    losses."""
    common = ["--config", "configs/tiny/test-dit.yaml", f"data.feature_path={feature_dir}", "train.log_every=1",
              "train.ckpt_every=1000", "data.num_workers=1"]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "train.py", *common, "train.max_steps=100000",
                             f"train.results_dir={stopped}"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not (glob.glob(str(stopped / "*" / "log.txt")) and
                                          max(run_losses(only_run(stopped)), default=0) >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    run = only_run(stopped)
    ckpts = sorted(glob.glob(os.path.join(run, "checkpoints", "*.pt")))
    assert len(ckpts) == 1, ckpts
    step = torch.load(ckpts[0], weights_only=True)["step"]
    assert 3 <= step < 1000 and max(run_losses(run)) == step  # the step it was on, not a checkpoint interval's
    log = open(os.path.join(run, "log.txt")).read()
    assert f"step {step}: stopped by SIGTERM with a checkpoint of this step; continue with --resume {run}" in log
    assert "done" not in log.splitlines()[-1]
    run_script(["train.py", "--resume", run, f"train.max_steps={step + 3}"])
    run_script(["train.py", *common, f"train.max_steps={step + 3}", f"train.results_dir={tmp_path / 'whole'}"])
    resumed, whole = run_losses(run), run_losses(only_run(tmp_path / "whole"))
    assert [resumed[s] for s in range(step + 1, step + 4)] == [whole[s] for s in range(step + 1, step + 4)]


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(feature_dir, tmp_path):
    """Two CPU processes (torchrun, gloo), SIGUSR1 to rank 1 alone: both finish the same step, rank 0 saves it, and
    neither hangs waiting for the other."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29633", "train.py", "--config", "configs/tiny/test-dit.yaml",
                             f"data.feature_path={feature_dir}", "train.max_steps=100000", "train.ckpt_every=1000",
                             "train.log_every=1", f"train.results_dir={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not (glob.glob(str(tmp_path / "*" / "log.txt")) and
                                          max(run_losses(only_run(tmp_path)), default=0) >= 3):
        time.sleep(0.2)
    rank1 = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_rank(int(p), proc.pid, "1")]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGUSR1)
    assert proc.wait(timeout=120) != 0  # torchrun reports the workers' stop status
    run = only_run(tmp_path)
    ckpts = glob.glob(os.path.join(run, "checkpoints", "*.pt"))
    assert len(ckpts) == 1
    step = torch.load(ckpts[0], weights_only=True)["step"]
    log = open(os.path.join(run, "log.txt")).read()
    assert f"step {step}: all 2 ranks hold identical weights" in log
    assert f"step {step}: stopped by a stop signal to another rank with a checkpoint of this step" in log


def _is_rank(pid: int, parent: int, rank: str) -> bool:
    """Whether process `pid` is a worker torchrun (`parent`) started, with RANK=rank."""
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return False
    return ppid == parent and f"RANK={rank}".encode() in env
