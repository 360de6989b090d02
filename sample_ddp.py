"""Sample many images for FID: one PNG per image index, ADM's .npz, and a JSON of the compute spent.

    torchrun --nproc_per_node 8 sample_ddp.py --config configs/DCDiT-B-N4.yaml --ckpt ckpt.pt \\
        --output-dir samples/dcdit-b-n4 --cfg-scale 1.5 [--num-fid-samples 50000] [--per-proc-batch-size 32] \\
        [--tail-dropping-fraction 0.2] [--lite-cfg --uncond-tail-dropping-fraction 0.9] [section.field=value ...]
    python sample_ddp.py ...             # the same, in one process

Image i is written to DIR/{i:06d}.png. Its starting noise, per-step noise and class label come from
generators seeded by (seed, i) (sampling.image_generators / class_labels), so the N images are the same
whatever the number of processes and the batch size (EDM2's per-image seeding). Rank r takes the
indices r, r + W, r + 2W, ...; an index whose PNG already exists and decodes at the right size is
skipped, so a killed run continues by rerunning the same command (a PNG truncated by the kill fails
the check and is drawn again; PNGs are written to a temporary name and renamed, so a finished PNG is
always whole). After a barrier rank 0 writes
  DIR.npz   arr_0 (N, H, W, 3) uint8, read back from the PNGs in index order (ADM's evaluation format);
  DIR.json  the resolved config, checkpoint, seed, guidance and tail-drop budgets, parameters, TFLOPs/img
            measured from the tokens the inner blocks really ran (models/flops.py), per-step kept-token
            statistics and raw counts (`kept_tokens`, (steps, rows): cond rows then uncond rows of the
            images drawn in this run, in index order), `tflops_per_img_by_component` (condition, encoder,
            router, ..., final_layer, summing to `tflops_per_img`; not for DyDiT), and per-step wall time /
            throughput (paper Fig. 4);
            with DyDiT (dydit.enabled, §4.5) also `dydit`: the TFLOPs/img its gates left (then also
            `tflops_per_img`), the DC-DiT's at the same kept tokens, their ratio, and per step the share of
            heads, MLP groups and MLP tokens kept.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from config import add_config_args, config_to_dict, main_guard
from data import to_uint8_images
from distributed import barrier, broadcast_object, gather_objects, setup_distributed, teardown_distributed
from fileio import atomic_write
from models import is_dcdit
from sampling import (SampleError, Sampler, add_sampling_args, class_labels, describe_budgets, generate, image_size,
                      load_model_for_sampling, load_vae_if_latent, uncond_budget)
from models.flops import (component_coeffs, count_params, dcdit_flops_coeffs, dydit_dims, dydit_info_row_flops,
                          static_block_flops, tflops_by_component, tflops_per_image_by_component)

SETTINGS_FILE = ".settings.json"  # inside DIR: what its PNGs were drawn with, checked on resume


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 through main_guard (not a usage dump)."""

    def error(self, message):
        raise SampleError(f"{message} (see --help)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--output-dir", required=True, help="folder of PNGs; DIR.npz and DIR.json go beside it")
    parser.add_argument("--per-proc-batch-size", type=int, default=None, help="images per process per batch")
    parser.add_argument("--num-fid-samples", type=int, default=None, help="N, the number of images")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls and convolutions on CUDA, as DiT's sample_ddp.py (default); --no-tf32 "
                             "samples in full fp32, where an image no longer depends on --per-proc-batch-size")
    args = parser.parse_args(argv)
    args.guidance_field = "fid_cfg_scale"  # --cfg-scale sets sample.fid_cfg_scale (1.5 unless set: DiT's FID setting)
    # As config overrides, so they are validated (and named) like any sample.* field and shown by --dry-run.
    for flag, key in (("per_proc_batch_size", "per_proc_batch_size"), ("num_fid_samples", "num_fid_samples")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"sample.{key}={getattr(args, flag)}")
    if not args.ckpt and not args.dry_run:
        raise SampleError("--ckpt is required: a training checkpoint or a public DiT state dict")
    return args


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

def png_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:06d}.png")


def png_ok(path: str, size: int) -> bool:
    """The PNG exists, passes PIL's checksum verification, decodes fully, and is size x size RGB."""
    from PIL import Image
    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as im:
            im.verify()  # chunk CRCs; a truncated file fails here or on load below
        with Image.open(path) as im:
            im.load()
            return im.format == "PNG" and im.size == (size, size) and im.mode == "RGB"
    except Exception:
        return False


def save_png(arr: np.ndarray, path: str) -> None:
    """(H, W, 3) uint8 -> PNG, written atomically (fileio.atomic_write): a kill never leaves half a PNG
    under the final name, and the temporary name does not end in .png, so folder readers never see it."""
    from PIL import Image
    atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def read_npz_images(out_dir: str, n: int, size: int, progress: bool) -> np.ndarray:
    """(n, size, size, 3) uint8 from DIR/{i:06d}.png, i = 0..n-1, in index order."""
    from PIL import Image
    from tqdm.auto import tqdm
    arr = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in tqdm(range(n), desc="building .npz", disable=not progress):
        with Image.open(png_path(out_dir, i)) as im:
            arr[i] = np.asarray(im.convert("RGB"))
    return arr


def run_settings(cfg, args) -> dict:
    """What decides the pixels of image i; a resumed run must match it (N and batch size may change)."""
    resolved = config_to_dict(cfg)
    sample = {k: v for k, v in resolved["sample"].items() if k not in ("per_proc_batch_size", "num_fid_samples")}
    return {"ckpt": os.path.abspath(args.ckpt), "use_ema": not args.no_ema, "model": resolved["model"],
            "diffusion": resolved["diffusion"], "data_kind": cfg.data.kind, "vae": cfg.data.vae,
            "vae_path": cfg.data.vae_path,
            "latent_scale": cfg.data.latent_scale, "latent_shift": cfg.data.latent_shift, "sample": sample,
            "tf32": bool(args.tf32)}


def check_settings(out_dir: str, settings: dict) -> str:
    """'' if DIR is new or was drawn with `settings` (then recorded), else a one-line explanation."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = _first_difference(old, settings)
        if diff:
            return (f"--output-dir {out_dir} holds images drawn with different settings ({diff}); use another "
                    f"--output-dir, or delete {path} if mixing them is intended")
        return ""
    atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))
    return ""


def _first_difference(old, new, prefix="") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return ""
    return "" if old == new else f"{prefix[:-1]} was {old!r}, now {new!r}"


# ----------------------------------------------------------------------------------------------------
# Statistics of the tokens actually run (DC-DiT) and of wall time
# ----------------------------------------------------------------------------------------------------

class RunLog:
    """Per-batch records of one rank: image indices, kept tokens per step per row, seconds per step."""

    def __init__(self):
        self.indices, self.cond, self.uncond, self.seconds, self.timesteps = [], [], [], [], None
        self.cond0, self.uncond0 = [], []  # a two-stage model's stage-0 counts

    def add(self, indices, records: list, use_cfg: bool) -> None:
        n = len(indices)
        self.indices.extend(int(i) for i in indices)
        self.timesteps = [r["t"] for r in records]
        self.seconds.append((n, np.array([r["seconds"] for r in records])))                 # (S,)
        for key, cond, uncond in (("kept", self.cond, self.uncond), ("kept0", self.cond0, self.uncond0)):
            if key in records[0]:
                kept = np.stack([r[key].numpy() for r in records], axis=1).astype(np.int32)  # (rows, S)
                cond.append(kept[:n])                                                        # (n, S)
                if use_cfg:
                    uncond.append(kept[n:])                                                  # (n, S)

    def payload(self) -> dict:
        return {"indices": self.indices, "cond": self.cond, "uncond": self.uncond, "seconds": self.seconds,
                "timesteps": self.timesteps, "cond0": self.cond0, "uncond0": self.uncond0}


class GateLog:
    """Stands in for a DyDiT model inside sampling.Sampler: passes every call through unchanged and adds up,
    per sampling step, what the gates left (ChunkInfo.dydit, priced by models.flops.dydit_info_row_flops).

    Per step it sums over rows: [rows, FLOPs as run, DC-DiT FLOPs at the same kept tokens, the inner
    blocks' static FLOPs, share of heads kept, share of MLP groups kept, tokens that ran an MLP, token
    slots (M x depth)].
    Sums, not per-row records: 50K images x 250 steps x 2 rows would not fit in a JSON.
    """

    FIELDS = ("rows", "flops", "dcdit_flops", "dcdit_block_flops", "heads", "groups", "tokens", "token_slots")

    def __init__(self, model):
        self.model = model
        self.coeffs = dcdit_flops_coeffs(model)
        self.dims, self.depth = dydit_dims(model)
        self.sums, self.step = {}, 0

    def start_batch(self) -> "GateLog":
        self.step = 0
        return self

    def __call__(self, *args, **kwargs):
        return self._record(self.model(*args, **kwargs))

    def forward_with_cfg(self, *args, **kwargs):
        return self._record(self.model.forward_with_cfg(*args, **kwargs))

    def _record(self, res):
        d = res[1].dydit
        flops, dcdit = dydit_info_row_flops(self.coeffs, self.dims, d)                  # (rows,) each
        kept = d.kept.detach().cpu().numpy().astype(np.float64)                         # (rows,)
        row = np.array([len(flops), flops.sum(), dcdit.sum(),
                        self.depth * static_block_flops(self.dims, kept).sum(),
                        float(d.heads.detach().mean((1, 2)).sum()), float(d.groups.detach().mean((1, 2)).sum()),
                        float(d.tokens.detach().sum()), kept.sum() * self.depth])
        self.sums[self.step] = self.sums.get(self.step, 0.0) + row
        self.step += 1
        return res

    def payload(self) -> list:
        return [self.sums[s] for s in sorted(self.sums)]                               # S x (8,)


def merge_gate_logs(payloads: list, timesteps, n_images: int, target_ratio: float) -> dict:
    """Rank GateLog payloads -> the JSON's `dydit` entry (None when nothing was drawn)."""
    parts = [np.stack(p) for p in payloads if p]
    if not parts or n_images == 0:
        return None
    sums = np.sum(parts, axis=0)                                                         # (S, 8)
    f = dict(zip(GateLog.FIELDS, sums.T))                                                # each (S,)
    blocks_run = f["flops"] - (f["dcdit_flops"] - f["dcdit_block_flops"])               # (S,)
    per_step = [{"t": t, "flops_ratio": float(f["flops"][s] / f["dcdit_flops"][s]),
                 "blocks_flops_ratio": float(blocks_run[s] / f["dcdit_block_flops"][s]),
                 "heads": float(f["heads"][s] / f["rows"][s]), "groups": float(f["groups"][s] / f["rows"][s]),
                 "tokens": float(f["tokens"][s] / f["token_slots"][s])}
                for s, t in enumerate(timesteps)]
    return {"target_ratio": target_ratio,
            "tflops_per_img": float(f["flops"].sum() / n_images / 1e12),
            "dcdit_tflops_per_img": float(f["dcdit_flops"].sum() / n_images / 1e12),
            "flops_ratio": float(f["flops"].sum() / f["dcdit_flops"].sum()),
            "blocks_flops_ratio": float(blocks_run.sum() / f["dcdit_block_flops"].sum()),
            "per_step": per_step}


def _summary(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": int(x.min()), "max": int(x.max())}


def merge_logs(payloads: list, use_cfg: bool) -> dict:
    """Rank payloads -> JSON fields: kept_tokens (S, rows) in index order, per-step stats, timing."""
    out = {"timesteps": next((p["timesteps"] for p in payloads if p["timesteps"]), None)}
    indices = np.array([i for p in payloads for i in p["indices"]], dtype=np.int64)
    out["measured_images"] = int(len(indices))
    if len(indices) and any(p["cond"] for p in payloads):
        order = np.argsort(indices, kind="stable")
        cond = np.concatenate([c for p in payloads for c in p["cond"]])[order]                 # (n, S)
        parts = [cond]
        if use_cfg:
            uncond = np.concatenate([u for p in payloads for u in p["uncond"]])[order]         # (n, S)
            parts.append(uncond)
        kept = np.concatenate(parts, axis=0).T                                                # (S, rows)
        out["kept_tokens"] = np.ascontiguousarray(kept)
        out["kept_tokens_rows"] = {"cond": int(len(cond)), "uncond": int(len(cond)) if use_cfg else 0}
        out["kept_stats"] = [{"t": t, "cond": _summary(cond[:, s]),
                              **({"uncond": _summary(uncond[:, s])} if use_cfg else {})}
                             for s, t in enumerate(out["timesteps"])]
        if any(p.get("cond0") for p in payloads):  # a two-stage model: stage 0's counts, the same layout
            parts0 = [np.concatenate([c for p in payloads for c in p["cond0"]])[order]]
            if use_cfg:
                parts0.append(np.concatenate([u for p in payloads for u in p["uncond0"]])[order])
            out["kept_tokens_stage0"] = np.ascontiguousarray(np.concatenate(parts0, axis=0).T)  # (S, rows)
    # Throughput per step: each rank's images over its seconds at that step, summed over ranks (they run
    # concurrently). A rank's first batch carries one-off warm-up costs, so it is left out when it has more.
    rates, seconds = [], []
    for p in payloads:
        timed = p["seconds"][1:] if len(p["seconds"]) > 1 else p["seconds"]
        if timed:
            n = sum(b for b, _ in timed)
            total = np.sum([s for _, s in timed], axis=0)                                     # (S,)
            rates.append(n / np.maximum(total, 1e-12))
            seconds.extend(s for _, s in timed)
    if rates:
        out["step_seconds"] = np.mean(seconds, axis=0).tolist()  # one model call, mean over timed batches
        out["images_per_second"] = np.sum(rates, axis=0).tolist()
    return out


def token_count(model) -> int:
    """L: the tokens a forward could run (DC-DiT's latent grid, DiT's patches)."""
    if hasattr(model, "grid"):
        return int(model.grid[0] * model.grid[1])
    return int(model.pos_embed.shape[1])


def dump_json(report: dict) -> str:
    """json.dumps, with the (S, rows) kept-count arrays (the inner blocks', and stage 0's for a two-stage model)
    written row by row: at 50K images, 250 steps and CFG one holds 25M counts, which as one nested Python list
    would take about 1 GB of memory."""
    arrays = {k: v for k, v in report.items() if k in ("kept_tokens", "kept_tokens_stage0") and isinstance(v, np.ndarray)}
    text = json.dumps({**report, **{k: f"__{k}__" for k in arrays}})
    for key, kept in arrays.items():
        rows = ",".join("[" + ",".join(map(str, row.tolist())) + "]" for row in kept)
        text = text.replace(f'"__{key}__"', f"[{rows}]", 1)
    return text


def run_counts(merged: dict):
    """The kept counts models.flops prices: (S, rows), or for a two-stage model (inner, stage 0)."""
    if "kept_tokens_stage0" in merged:
        return merged["kept_tokens"], merged["kept_tokens_stage0"]
    return merged["kept_tokens"]


def measure_tflops(model, cfg, merged: dict):
    """TFLOPs per image over the whole sampling run (models/flops.py), from measured kept tokens for DC-DiT."""
    from models.flops import dcdit_flops_coeffs, forward_flops, tflops_from_counts
    use_cfg = cfg.sample.cfg_scale > 1.0
    if is_dcdit(cfg.model.name):
        if "kept_tokens" not in merged:
            return None  # nothing drawn in this run: no measurement
        return float(tflops_from_counts(dcdit_flops_coeffs(model), run_counts(merged), use_cfg))
    return forward_flops(model) * cfg.sample.num_sampling_steps * (2 if use_cfg else 1) / 1e12


def measure_tflops_by_component(model, cfg, merged: dict, total: float):
    """measure_tflops split by part of the model ({component: TFLOPs/img}, models.flops.component_coeffs priced at
    the same measured kept counts; a DiT's fixed component_flops), checked to sum to `total`, its value."""
    use_cfg = cfg.sample.cfg_scale > 1.0
    if is_dcdit(cfg.model.name):
        parts = tflops_by_component(component_coeffs(model), run_counts(merged), use_cfg)
    else:
        parts = tflops_per_image_by_component(model, steps=cfg.sample.num_sampling_steps, cfg=use_cfg)
    if not math.isclose(sum(parts.values()), total, rel_tol=1e-9):
        raise RuntimeError(f"TFLOPs/img by component sum to {sum(parts.values())!r}, the total is {total!r}")
    return parts


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    if device.type == "cuda":
        # DiT's sample_ddp.py samples with TF32 matmuls: faster, and FID is unaffected, but TF32 rounding depends on
        # the GEMM's shape, so about 2% of pixels move by 1/255 between batch sizes. --no-tf32 keeps full fp32.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    try:
        run(args, rank, world, device)
        # Every rank leaves the process group together, once rank 0 has written the .npz: a rank that tore its
        # group down while rank 0 still worked was seen to abort in gloo's shutdown (SIGABRT, so torchrun reported
        # the run failed). After an error nobody waits here: torchrun stops the other ranks.
        barrier()
    finally:
        teardown_distributed()


@torch.no_grad()
def run(args, rank: int, world: int, device) -> None:
    from tqdm.auto import tqdm
    model, cfg = load_model_for_sampling(args, args.ckpt, not args.no_ema, device)
    s = cfg.sample
    out_dir = os.path.normpath(args.output_dir)
    n_total, size = s.num_fid_samples, image_size(cfg)
    use_cfg = s.cfg_scale > 1.0

    problem = ""
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        problem = check_settings(out_dir, run_settings(cfg, args))
    problem = broadcast_object(problem)
    if problem:
        raise SampleError(problem)

    todo = [i for i in range(rank, n_total, world) if not png_ok(png_path(out_dir, i), size)]
    counts = gather_objects(len(todo))
    if rank == 0:
        remaining = sum(counts)
        print(f"{cfg.model.name}: {n_total} images in {out_dir} ({n_total - remaining} already there), "
              f"{world} process(es) x batch {s.per_proc_batch_size}; {describe_budgets(cfg)}", flush=True)
    vae = load_vae_if_latent(cfg, device) if todo else None
    log = RunLog()
    gates = GateLog(model) if cfg.dydit.enabled else None  # DyDiT: FLOPs as its gates left them
    bar = tqdm(total=len(todo), desc=f"rank 0 of {world}", disable=rank != 0)
    for start in range(0, len(todo), s.per_proc_batch_size):
        batch = todo[start:start + s.per_proc_batch_size]
        labels = class_labels(s.seed, batch, cfg.model.num_classes)                # (n,)
        runner = model if gates is None else gates.start_batch()
        sampler = Sampler(runner, cfg, s.cfg_scale, s.tail_dropping_fraction, uncond_budget(cfg), keep_maps=False)
        images = generate(model, cfg, labels, seed=s.seed, device=device, indices=batch, sampler=sampler, vae=vae)
        for i, arr in zip(batch, to_uint8_images(images)):                         # (n, H, W, 3)
            save_png(arr, png_path(out_dir, i))
        log.add(batch, sampler.records, use_cfg)
        bar.update(len(batch))
    bar.close()

    barrier()
    payloads = gather_objects(log.payload())
    gate_payloads = gather_objects(gates.payload() if gates is not None else None)
    if rank != 0:
        return
    missing = [i for i in range(n_total) if not os.path.isfile(png_path(out_dir, i))]
    if missing:
        raise SampleError(f"{len(missing)} PNGs missing after sampling (first {png_path(out_dir, missing[0])}); rerun")
    arr = read_npz_images(out_dir, n_total, size, progress=True)                   # (N, H, W, 3)
    atomic_write(f"{out_dir}.npz", lambda f: np.savez(f, arr_0=arr))
    merged = merge_logs(payloads, use_cfg)
    report = {
        "config": config_to_dict(cfg), "ckpt": os.path.abspath(args.ckpt), "use_ema": not args.no_ema,
        "model": cfg.model.name, "params": count_params(model),
        "num_images": n_total, "image_size": size, "seed": s.seed, "cfg_scale": s.cfg_scale,
        "num_sampling_steps": s.num_sampling_steps, "tail_dropping_fraction": s.tail_dropping_fraction,
        "lite_cfg": s.lite_cfg, "uncond_tail_dropping_fraction": uncond_budget(cfg),
        "token_count": token_count(model), "world_size": world, "per_proc_batch_size": s.per_proc_batch_size,
        "npz": os.path.abspath(f"{out_dir}.npz"), **merged,
    }
    report["tflops_per_img"] = measure_tflops(model, cfg, merged)
    # Not for DyDiT: its TFLOPs/img below are the gates' per-step sums (GateLog), which keep no split by part.
    if report["tflops_per_img"] is not None and not cfg.dydit.enabled:
        report["tflops_per_img_by_component"] = measure_tflops_by_component(model, cfg, merged,
                                                                            report["tflops_per_img"])
    if cfg.dydit.enabled:
        report["dydit"] = merge_gate_logs(gate_payloads, merged["timesteps"], merged["measured_images"],
                                          cfg.dydit.target_ratio)
        if report["dydit"] is not None:  # what ran; the DC-DiT's cost at the same kept tokens stays in `dydit`
            report["tflops_per_img"] = report["dydit"]["tflops_per_img"]
    atomic_write(f"{out_dir}.json", lambda f: f.write(dump_json(report).encode()))
    tflops = report["tflops_per_img"]
    tflops = "n/a (no image drawn in this run)" if tflops is None else f"{tflops:.4g}"
    print(f"wrote {out_dir}.npz {tuple(arr.shape)} and {out_dir}.json (TFLOPs/img {tflops})", flush=True)


if __name__ == "__main__":
    sys.exit(main_guard(main)())
