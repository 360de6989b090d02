"""Train DiT or DC-DiT with Accelerate (Fast-DiT's way of working).

    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/DCDiT-B-N4.yaml
    python train.py --config configs/tiny/dcdit-digits.yaml train.max_steps=2000     # CPU
    python train.py --config ... --resume results/003-DCDiT-B                      # continue exactly
    python train.py --config configs/DCDiT-XL-N4-upcycle.yaml --upcycle-from DiT-XL-2-256x256.pt  # §4.4
    python train.py --config configs/DCDiT-B-N4-DyDiT.yaml dydit.init_checkpoint=<DC-DiT ckpt>     # §4.5

Any config field can be overridden as `section.field=value`. Runs live in `results/NNN-name/` with
`config.yaml`, `log.txt` and `checkpoints/{step:07d}.pt`. Resume is exact: the data order and every
random draw of a step are functions of (seed, step, rank), so a resumed run repeats the losses of an
uninterrupted one.

Upcycling (paper §4.4, docs/upcycling.md): a fresh run copies a DiT checkpoint's blocks and (frozen)
embedders into the DC-DiT, then trains for upcycle.distill_steps steps on activation distillation from
the frozen DiT before the diffusion loss takes over; which loss a step uses is a function of the step,
so resuming on either side of the switch repeats the uninterrupted run.

DyDiT (paper §4.5, docs/dydit.md): with dydit.enabled the inner blocks carry DyDiT's gates; a fresh run
loads every weight of the DC-DiT checkpoint dydit.init_checkpoint strictly (only the new gate routers
keep their all-on init), and the FLOPs loss (mean F_dyn / F_static - lambda)^2 joins the diffusion and
ratio losses.
"""
import argparse
import glob
import json
import logging
import math
import os
import re
import sys
import time
from copy import deepcopy

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import add_config_args, config_from_args, config_to_dict, load_config, main_guard, save_config
from data import build_dataset
from diffusion import create_diffusion
from fileio import atomic_save
from models import create_model, is_dcdit
from models.checkpoint_io import read_checkpoint
from models.dydit import flops_loss, flops_ratio, load_dcdit_weights, read_dcdit_checkpoint
from models.routing import compression_stats, ratio_loss
from models.upcycle import (build_teacher, distillation_loss, freeze_embedders, load_dit_checkpoint,
                            reset_untouched_adam_state, upcycle_, upcycle_model_config)
from sampling import class_grid, generate, save_grid
from models.flops import dcdit_flops_coeffs


class TrainError(RuntimeError):
    user_error = True


# ----------------------------------------------------------------------------- helpers

class StepBatchSampler:
    """Deterministic, resumable sharding: global batch s is positions [s*G, (s+1)*G) of an endless
    stream of per-epoch permutations seeded by (seed, epoch); each rank takes its contiguous slice."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int, micro: int):
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.step, self.micro = seed, start_step, micro
        self._perm_epoch, self._perm = -1, None

    def _positions(self, start: int, count: int) -> list:
        out = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, self.n)
            if epoch != self._perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
            out.append(int(self._perm[i]))
        return out

    def __iter__(self):
        local = self.global_batch // self.world
        while True:
            idx = self._positions(self.step * self.global_batch + self.rank * local, local)
            for k in range(0, local, self.micro):
                yield idx[k:k + self.micro]
            self.step += 1


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of every random draw of one optimizer step on one rank (t, noise, label dropout, random router)."""
    return ((seed * 1_000_003 + step) * 4099 + rank) % (2 ** 63)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:  # frozen ones (pos_embed, upcycled embedders) never change: keep them exact
            ema_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def label_drop_ids(batch: int, prob: float, device) -> torch.Tensor:
    """(B,) long, 1 = replace the label by the null class: DiT's label dropout drawn once outside the model, so
    the student and the distillation teacher are conditioned on the same labels (force_drop_ids)."""
    return (torch.rand(batch, device=device) < prob).long()


def latest_checkpoint(run_dir: str):
    ckpts = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]" * 7 + ".pt")))
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str) -> tuple:
    """--resume accepts a checkpoint file or a run folder (its newest checkpoint). -> (run_dir, ckpt)."""
    if os.path.isdir(resume):
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise TrainError(f"--resume {resume}: no checkpoints/NNNNNNN.pt in this run folder")
        return resume, ckpt
    if not os.path.isfile(resume):
        raise TrainError(f"--resume {resume}: no such file or run folder")
    return os.path.dirname(os.path.dirname(os.path.abspath(resume))), resume


def load_checkpoint(path: str) -> dict:
    ckpt = read_checkpoint(path, "--resume", TrainError, "a training checkpoint of this repo")
    missing = {"model", "ema", "opt", "config", "step"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise TrainError(f"checkpoint {path} is not a training checkpoint of this repo (missing {sorted(missing)})")
    return ckpt


def new_run_dir(results_dir: str, name: str) -> str:
    os.makedirs(results_dir, exist_ok=True)
    existing = [int(m.group(1)) for d in os.listdir(results_dir) if (m := re.match(r"(\d{3,})-", d))]
    run_dir = os.path.join(results_dir, f"{max(existing, default=-1) + 1:03d}-{name}")
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    return run_dir


def make_logger(run_dir, is_main: bool) -> logging.Logger:
    logger = logging.getLogger("train")
    logger.handlers.clear()
    logger.propagate = False
    if is_main:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(run_dir, "log.txt"))):
            h.setFormatter(fmt)
            logger.addHandler(h)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def make_accelerator(cfg):
    from accelerate import Accelerator

    # Without CUDA, a plain Accelerator() under torchrun silently trains each rank alone; cpu=True makes it
    # join the gloo process group (MULTI_CPU), so CPU multi-process runs really are data parallel.
    cpu = not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.grad_accum_steps)


@torch.no_grad()
def check_ranks_in_sync(model: torch.nn.Module, accelerator) -> bool:
    """All ranks must hold identical weights (DDP averages gradients); compare a cheap checksum."""
    if accelerator.num_processes == 1:
        return True
    vec = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(accelerator.device)
    gathered = accelerator.gather(vec.unsqueeze(0))                            # (world, n_params)
    return bool(torch.equal(gathered, gathered[:1].expand_as(gathered)))


def ratio_target(cfg, step: int) -> float:
    """Compression target N, optionally ramped linearly from ratio_ramp_start over ratio_ramp_steps (§3.5)."""
    n = cfg.model.downsample_factor
    if cfg.train.ratio_ramp_steps <= 0:
        return n
    a = min(1.0, step / cfg.train.ratio_ramp_steps)
    return cfg.train.ratio_ramp_start + a * (n - cfg.train.ratio_ramp_start)


def multi_budget_start(cfg) -> int:
    """First step of multi-budget training; unset = when the N ramp ends, so the router first learns its
    target ratio before it is asked to rank its boundaries (the authors' release)."""
    t = cfg.train
    return t.ratio_ramp_steps if t.multi_budget_start_step is None else t.multi_budget_start_step


def multi_budget_fraction(cfg, step: int) -> float:
    """Tail-drop fraction of this step: drawn with a generator seeded by the step, so every rank agrees."""
    t = cfg.train
    if not t.multi_budget or step < multi_budget_start(cfg):
        return 0.0
    g = torch.Generator().manual_seed(step)
    return float(t.multi_budget_drop_fractions[int(torch.randint(len(t.multi_budget_drop_fractions), (1,), generator=g))])


def sample_grid(ema, cfg, device, path: str) -> None:
    """Periodic EMA samples (one per class, CFG), saved as a PNG grid with each row's classes beside it."""
    labels = torch.arange(min(cfg.model.num_classes, 16), device=device)
    images = generate(ema, cfg, labels, seed=cfg.sample.seed, device=device)
    order, per_row, row_labels = class_grid(labels.tolist(), nrow=int(math.ceil(len(labels) ** 0.5)))
    save_grid(images[order], path, nrow=per_row, row_labels=row_labels)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--resume", default="", help="checkpoint file or run folder to continue exactly")
    parser.add_argument("--upcycle-from", default="", metavar="PATH",
                        help="DiT checkpoint to upcycle into the DC-DiT (a fresh run; = upcycle.checkpoint=PATH)")
    args = parser.parse_args(argv)
    if args.upcycle_from:
        if args.resume:
            raise TrainError("--upcycle-from starts a new run; a resumed run takes its weights from its own "
                             "checkpoint and its teacher from upcycle.checkpoint in its saved config")
        args.overrides.append(f"upcycle.checkpoint={args.upcycle_from}")

    run_dir, ckpt = None, None
    if args.resume:
        run_dir, ckpt_path = resolve_resume(args.resume)
        ckpt = load_checkpoint(ckpt_path)
        # The run's own config; --config / overrides given now refine it (e.g. train.max_steps to train longer).
        cfg = load_config(args.config, args.overrides, base=ckpt["config"])
    else:
        cfg = config_from_args(args)

    # Upcycling (§4.4): the DiT checkpoint is read once. A fresh run takes its weights and fixes
    # model.pos_scale / model.cond_adaptor before the model is built and the config saved; any run still
    # inside the distillation warm-up (fresh or resumed) builds the frozen teacher from it.
    uc = cfg.upcycle
    resumed_step = int(ckpt["step"]) if ckpt is not None else 0
    distill_run = bool(uc.checkpoint) and uc.distill_steps > 0
    dit_ckpt, upcycle_notes = None, []
    if uc.checkpoint:
        if not is_dcdit(cfg.model.name):
            raise TrainError(f"upcycle.checkpoint is set but model.name {cfg.model.name!r} is not a DC-DiT; "
                             f"upcycling turns a DiT checkpoint into a DCDiT-* model")
        if ckpt is None or (distill_run and resumed_step < uc.distill_steps):
            dit_ckpt = load_dit_checkpoint(uc.checkpoint)
        if ckpt is None:
            upcycle_notes = upcycle_model_config(cfg.model, dit_ckpt)
    # DyDiT fine-tuning (§4.5): a fresh run reads its DC-DiT checkpoint before anything is created.
    dy = cfg.dydit
    dcdit_init = None
    if dy.enabled and dy.init_checkpoint and ckpt is None:
        dcdit_init = read_dcdit_checkpoint(dy.init_checkpoint)                    # (state_dict, which weights)

    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    tc = cfg.train
    if tc.global_batch_size % (world * tc.grad_accum_steps):
        raise TrainError(f"train.global_batch_size {tc.global_batch_size} is not divisible by world size {world} "
                         f"x train.grad_accum_steps {tc.grad_accum_steps}")
    micro = tc.global_batch_size // (world * tc.grad_accum_steps)

    # Run folder: made by rank 0, its path shared with the others.
    if run_dir is None:
        name = tc.exp_name or cfg.model.name.replace("/", "-")
        holder = [new_run_dir(tc.results_dir, name) if accelerator.is_main_process else None]
        if world > 1:
            dist.broadcast_object_list(holder, src=0)
        run_dir = holder[0]
    logger = make_logger(run_dir, accelerator.is_main_process)
    if accelerator.is_main_process:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        for stale in glob.glob(os.path.join(run_dir, "checkpoints", "*.tmp.*")):
            os.remove(stale)  # a checkpoint write interrupted by a crash; the previous checkpoint is intact
    logger.info(f"run folder {run_dir}; {world} process(es) on {device}; micro-batch {micro} x accum "
                f"{tc.grad_accum_steps} x world {world} = global {tc.global_batch_size}")

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = create_model(cfg.model, cfg.dydit)
    if dy.enabled and ckpt is None:
        if dcdit_init is not None:
            gates = load_dcdit_weights(model, dcdit_init[0], dy.init_checkpoint)
            logger.info(f"DyDiT fine-tuning (§4.5) from {dy.init_checkpoint} ({dcdit_init[1]} weights): every DC-DiT "
                        f"weight loaded strictly; {len(gates)} gate-router tensors keep their init (every gate on)")
            dcdit_init = None
        else:
            logger.info("DyDiT gates on a freshly initialised DC-DiT (dydit.init_checkpoint is empty; the paper "
                        "fine-tunes a trained DC-DiT)")
    # dydit.flops_scope=model: the FLOPs loss prices the whole forward, so it needs the DC-DiT's a + b M + c M^2.
    dcdit_coeffs = None
    if dy.enabled and dy.flops_scope == "model":
        dcdit_coeffs = dcdit_flops_coeffs(model)
    teacher = None
    if uc.checkpoint:
        for note in upcycle_notes:
            logger.info(note)
        if ckpt is None:
            logger.info(upcycle_(model, dit_ckpt).summary(dit_ckpt))
        else:
            freeze_embedders(model)  # the weights come from our checkpoint; the optimizer must see the same list
        if dit_ckpt is not None and distill_run:
            teacher = build_teacher(dit_ckpt, model).to(device)
            logger.info(f"activation distillation for steps [0, {uc.distill_steps}) from a frozen DiT teacher "
                        f"({uc.checkpoint}, patch {teacher.patch_size}); the ratio loss stays on during it so the "
                        f"router still learns its budget; then the diffusion loss")
        dit_ckpt = None
    ema = deepcopy(model).requires_grad_(False)
    dcdit = is_dcdit(cfg.model.name)
    logger.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay)

    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start_step = int(ckpt["step"])
        logger.info(f"resumed from step {start_step}")
        del ckpt

    diffusion = create_diffusion(timestep_respacing=cfg.diffusion.timestep_respacing,
                                 noise_schedule=cfg.diffusion.noise_schedule, learn_sigma=cfg.model.learn_sigma,
                                 diffusion_steps=cfg.diffusion.diffusion_steps)
    dataset = build_dataset(cfg.data, expected_shape=(cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size))
    sampler = StepBatchSampler(len(dataset), tc.global_batch_size, rank, world, tc.seed, start_step, micro)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.num_workers > 0)
    logger.info(f"dataset: {len(dataset):,} items ({cfg.data.kind})")

    ema.to(device)
    model, opt = accelerator.prepare(model, opt)
    if tc.compile:
        model = torch.compile(model)
    raw_model = accelerator.unwrap_model(model)
    model.train()
    ema.eval()

    wandb_run = None
    if tc.wandb != "disabled" and accelerator.is_main_process:
        import wandb
        wandb_run = wandb.init(project="dc-dit", name=os.path.basename(run_dir), dir=run_dir, mode=tc.wandb,
                               config=config_to_dict(cfg))

    def save(step: int) -> None:
        if not accelerator.is_main_process:
            return
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        previous = latest_checkpoint(run_dir) or "none"
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            raise TrainError(f"weights are not finite at step {step}; not saving them (last good checkpoint: "
                             f"{previous})")
        try:
            atomic_save({"model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "config": config_to_dict(cfg), "step": step, "rng": {"torch": torch.get_rng_state()}}, path)
        except OSError as e:
            raise TrainError(f"could not write checkpoint {path}: {e.strerror or e}; the previous checkpoint "
                             f"{previous} is intact") from None
        logger.info(f"saved checkpoint {path}")
        if tc.keep_last_ckpts > 0:
            for old in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]" * 7 + ".pt")))[:-tc.keep_last_ckpts]:
                os.remove(old)

    stats = {"loss": 0.0, "diffusion": 0.0, "distill": 0.0, "ratio": 0.0, "flops": 0.0, "n": 0, "n_distill": 0}
    comp, flops_ratios = [], []
    t0 = time.time()
    data_iter = iter(loader)
    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not accelerator.is_main_process, desc="train",
               dynamic_ncols=True)
    for step in range(start_step, tc.max_steps):
        distilling = distill_run and step < uc.distill_steps
        if distill_run and step == uc.distill_steps:
            teacher = None
            n_reset = reset_untouched_adam_state(opt)
            logger.info(f"step {step}: activation distillation done; diffusion loss from here on (fresh Adam "
                        f"state for {n_reset} parameter tensors the distillation loss never reached)")
        torch.manual_seed(step_seed(tc.seed, step, rank))
        fraction = multi_budget_fraction(cfg, step) if dcdit else 0.0
        n_target = ratio_target(cfg, step)
        for _ in range(tc.grad_accum_steps):
            x, y = next(data_iter)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            infos = []

            def model_fn(x_t, ts, **kw):
                if not dcdit:
                    return model(x_t, ts, **kw)
                out, info = model(x_t, ts, return_info=True, tail_drop=fraction, **kw)
                infos.append(info)
                return out

            with accelerator.accumulate(model), accelerator.autocast():
                if distilling:
                    x_t = diffusion.q_sample(x, t, noise=torch.randn_like(x))
                    drop = label_drop_ids(x.shape[0], cfg.model.class_dropout_prob, device)
                    main_loss, info = distillation_loss(model, teacher, x_t, t, y, drop, fraction)
                    infos.append(info)
                else:
                    terms = diffusion.training_losses(model_fn, x, t, model_kwargs=dict(y=y))
                    main_loss = terms["loss"].mean()
                loss = main_loss
                r_loss = torch.zeros((), device=device)
                if dcdit:
                    r = infos[0].router
                    # The ratio loss sees the natural (pre-drop) decisions, so multi-budget training does not
                    # teach the router to keep more tokens to make up for the dropped ones.
                    r_loss = ratio_loss(r.natural_mask, r.prob, n_target, tc.ratio_group_size)
                    loss = loss + tc.ratio_loss_weight * r_loss
                    comp.append(compression_stats(r.natural_mask)["compression"].detach())
                f_loss = torch.zeros((), device=device)
                if dy.enabled:
                    # DyDiT's FLOPs loss (§4.5): the gates' straight-through gradient pulls F_dyn / F_static to lambda.
                    f_loss = flops_loss(infos[0].dydit, dy.target_ratio, dcdit_coeffs)
                    loss = loss + dy.flops_loss_weight * f_loss
                    flops_ratios.append(flops_ratio(infos[0].dydit, dcdit_coeffs).detach().float())
                # Decided on all ranks together: a rank that skipped or stopped alone would hang the others.
                bad = accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), reduction="sum")
                if bad.item() > 0:
                    msg = (f"non-finite loss at step {step + 1} on {int(bad.item())} rank(s); last good checkpoint: "
                           f"{latest_checkpoint(run_dir) or 'none'}")
                    if tc.nan_policy == "stop":
                        raise TrainError(msg + "; stopping (train.nan_policy=stop)")
                    logger.info(msg + "; skipping the step (train.nan_policy=skip)")
                    opt.zero_grad(set_to_none=True)
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            stats["loss"] += loss.item()
            stats["distill" if distilling else "diffusion"] += main_loss.item()
            stats["ratio"] += r_loss.item()
            stats["flops"] += f_loss.item()
            stats["n"] += 1
            stats["n_distill"] += int(distilling)
        update_ema(ema, raw_model, tc.ema_decay)
        done = step + 1
        bar.update(1)

        if done % tc.log_every == 0 or done == tc.max_steps:
            elapsed = time.time() - t0
            keys = ("loss", "diffusion", "distill", "ratio", "flops", "n", "n_distill")
            vals = accelerator.reduce(torch.tensor([float(stats[k]) for k in keys], device=device), reduction="sum")
            tot = dict(zip(keys, vals.tolist()))
            n, n_distill = max(tot["n"], 1), tot["n_distill"]
            steps = n / (tc.grad_accum_steps * world)
            log = {"step": done, "loss": tot["loss"] / n}
            # Each objective averaged over the micro-steps that used it (a window may straddle the switch).
            if n_distill < tot["n"] or not distill_run:
                log["diffusion_loss"] = tot["diffusion"] / max(tot["n"] - n_distill, 1)
            if n_distill > 0:
                log["distill_loss"] = tot["distill"] / n_distill
            log.update(steps_per_sec=steps / elapsed, images_per_sec=steps * tc.global_batch_size / elapsed,
                       lr=opt.param_groups[0]["lr"])
            if dcdit:
                cr = accelerator.gather(torch.cat(comp)).float()
                log.update(ratio_loss=tot["ratio"] / n, compression_gmean=cr.log().mean().exp().item(),
                           compression_std=cr.std().item() if cr.numel() > 1 else 0.0,
                           compression_min=cr.min().item(), compression_max=cr.max().item(), tail_drop=fraction)
            if dy.enabled:
                fr = accelerator.gather(torch.cat(flops_ratios))
                log.update(flops_loss=tot["flops"] / n, flops_ratio=fr.mean().item())
            logger.info(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in log.items()}))
            bar.set_postfix(loss=f"{log['loss']:.4f}")
            if wandb_run is not None:
                wandb_run.log(log, step=done)
            stats = {"loss": 0.0, "diffusion": 0.0, "distill": 0.0, "ratio": 0.0, "flops": 0.0, "n": 0, "n_distill": 0}
            comp, flops_ratios = [], []
            t0 = time.time()

        if done % tc.ckpt_every == 0 or done == tc.max_steps:
            if not check_ranks_in_sync(raw_model, accelerator):
                raise TrainError(f"ranks hold different weights at step {done}; not saving a checkpoint")
            if world > 1:
                logger.info(f"step {done}: all {world} ranks hold identical weights")
            save(done)
            accelerator.wait_for_everyone()
        if tc.sample_every > 0 and done % tc.sample_every == 0 and accelerator.is_main_process:
            sample_grid(ema, cfg, device, os.path.join(run_dir, f"samples_{done:07d}.png"))
    bar.close()
    logger.info("done")
    if wandb_run is not None:
        wandb_run.finish()
    accelerator.end_training()


if __name__ == "__main__":
    main_guard(main)()
