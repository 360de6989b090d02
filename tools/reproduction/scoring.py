"""Sampling and scoring a trained run: sample sets from the same per-image noise and labels (cached with their FID
features), FID with a bootstrap spread, measured TFLOPs per image, compression by timestep and the boundary maps."""
import copy
import dataclasses
import json
import os
import re
import time

import numpy as np
import torch
from tqdm import tqdm

from data import DigitsDataset, digits_rgb, to_uint8_images
from evaluations.activations import compute_activations
from evaluations.digits import load_classifier, recognised
from evaluations.images import ArrayImages
from evaluations.inception import WeightsUnavailable, feature_net, file_sha256
from evaluations.metrics import frechet_distance_to_activations, gaussian_statistics
from fileio import atomic_write
from models.flops import dcdit_flops_coeffs, forward_flops, tflops_from_counts
from sampling import Sampler, generate
from visualize import chunking_viz

from .plan import LATENT_IMAGE_SIZE, SEED, Plan, ReproduceError, check_deadline


def real_digits(space: str, indices, size: int) -> np.ndarray:
    """Real digits as that space's samples look: (n, size, size, 3) pixels, or (n, 64, 64, 3) for latents."""
    if space == "latent":
        return to_uint8_images(digits_rgb(LATENT_IMAGE_SIZE)[0][torch.as_tensor(indices)])
    return to_uint8_images(DigitsDataset(indices, size=size).images)




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
    """A sample set with its FID features (or real digits' features), from `path` when it was made for the same
    `ident` (checkpoint, its digest, plan, fractions, features), else made by `make()` and saved there first
    (atomically): a killed report loses at most the set it was sampling. make() returns arrays, numbers and Nones;
    they come back as such."""
    key = json.dumps(ident, sort_keys=True)
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            if str(z["ident"]) == key:
                # None is stored as an empty array, a number as a 0-d one.
                return {k: None if z[k].size == 0 else z[k].item() if z[k].ndim == 0 else z[k]
                        for k in z.files if k != "ident"}
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
    fid = frechet_distance_to_activations(*ref_stats, acts)
    g = np.random.default_rng(SEED)
    boots = [frechet_distance_to_activations(*ref_stats, acts[g.integers(0, len(acts), len(acts))])
             for _ in range(bootstraps)]
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


class Scorer:
    """Scores sample sets against real digits in one space: FID against the features of plan.n_ref real digits
    (with the real-vs-real floor at the sample size) and the share a digit classifier recognises as their class.
    Every set and its features are cached in work/scores (cached_set); wall times go to `phases`."""

    def __init__(self, space: str, size: int, plan: Plan, work: str, feature_kind: str, phases: dict,
                 deadline: float = None):
        self.space, self.size, self.plan, self.work, self.phases = space, size, plan, work, phases
        self.deadline = deadline  # a time.monotonic() past which no new sample set starts (--minutes)
        try:
            self.net, self.feature_label = feature_net(feature_kind)
        except WeightsUnavailable as e:
            raise ReproduceError(str(e)) from None
        perm = torch.randperm(5000, generator=torch.Generator().manual_seed(SEED))
        self.ref_stats = gaussian_statistics(self.real_features("reference", perm[:plan.n_ref]))
        floor = perm[plan.n_ref:plan.n_ref + plan.n_samples]
        fid, fid_sd = fid_with_spread(self.ref_stats, self.real_features("floor", floor), plan.bootstraps)
        self.classifier, self.classifier_accuracy = load_classifier(os.path.join(work, "digit_classifier.pt"),
                                                                    plan.classifier_epochs)
        self.floor = {"fid": fid, "fid_sd": fid_sd, "recognised": recognised(
            self.classifier, real_digits(space, floor, size), DigitsDataset().labels[floor].numpy())}

    def real_features(self, name: str, indices) -> np.ndarray:
        """FID features of real digits (the reference set, the real-vs-real floor), cached as the sample sets are."""
        ident = {"real": name, "space": self.space, "size": self.size, "indices": indices.tolist(),
                 "features": self.feature_label, "weights": getattr(self.net, "weights_sha256", None)}
        make = lambda: {"acts": features(self.net, real_digits(self.space, indices, self.size), name)}  # noqa: E731
        return cached_set(os.path.join(self.work, "scores", f"real_{name}.npz"), ident, make)["acts"]

    def score(self, model, cfg, name: str, source: str, f: float = 0.0, uncond_f=None, vae=None) -> tuple:
        """Sample one set from `model` (the weights of checkpoint `source`, "#..." marking a variant of them) at
        tail-drop f (uncond_f: Lite-CFG's unconditional rows) and score it -> (row, the sample set)."""
        plan = self.plan

        def make() -> dict:
            check_deadline(self.deadline, f"sampling {name}")
            s = sample_set(model, cfg, plan, f, desc=f"sample {name}", vae=vae, uncond_tail_drop=uncond_f)
            start = time.perf_counter()
            acts = features(self.net, s["images"], f"features {name}")
            return dict(s, acts=acts, feature_seconds=time.perf_counter() - start)

        # The checkpoint's content, not only its path: a run retrained to the same step writes a file of the same
        # name and size.
        ident = {"source": source, "sha256": file_sha256(source.split("#")[0]), "plan": dataclasses.asdict(plan),
                 "f": f, "uncond_f": uncond_f, "features": self.feature_label}
        s = cached_set(os.path.join(self.work, "scores", re.sub(r"[^\w.=-]+", "_", name) + ".npz"), ident, make)
        self.phases[f"sampling {name}"] = s["seconds"]
        start = time.perf_counter()
        fid, fid_sd = fid_with_spread(self.ref_stats, s["acts"], plan.bootstraps)
        self.phases[f"FID {name}"] = float(s["feature_seconds"]) + time.perf_counter() - start
        ratio = compression_by_step(s["kept"], s["t"], cfg.model.input_size ** 2) if s["kept"] is not None else None
        labels = np.arange(plan.n_samples) % cfg.model.num_classes
        row = {"f": f, "tflops": tflops_per_image(model, s["kept"], plan.sampling_steps, s["kept0"]), "fid": fid,
               "fid_sd": fid_sd, "compression": ratio["overall"] if ratio else float(model.patch_size ** 2),
               "recognised": recognised(self.classifier, s["images"], labels)}
        if s["gated_tflops"] is not None:  # DyDiT: the FLOPs its gates left, against the DC-DiT's at those tokens
            row["flops_ratio"], row["tflops"] = s["gated_tflops"] / row["tflops"], s["gated_tflops"]
        return dict(row, ratio=ratio), s
