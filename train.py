"""Train DiT or DC-DiT with Accelerate (Fast-DiT's way of working).

    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/DCDiT-B-N4.yaml
    python train.py --config configs/tiny/dcdit-digits.yaml train.max_steps=2000     # CPU
    python train.py --config ... --resume results/003-DCDiT-B                      # continue exactly
    python train.py --config configs/DCDiT-XL-N4-upcycle.yaml --upcycle-from DiT-XL-2-256x256.pt  # §4.4
    python train.py --config configs/DCDiT-B-N4-DyDiT.yaml dydit.init_checkpoint=<DC-DiT ckpt>     # §4.5

Any config field can be overridden as `section.field=value`. Runs live in `results/NNN-name/` with
`config.yaml`, `log.txt` and `checkpoints/{step:07d}.pt`. Resume is exact: the data order and every
random draw of a step are functions of (seed, step, rank), so a resumed run repeats the losses of an
uninterrupted one. One process trains a run folder at a time: a second `--resume` of a folder still being
trained is refused (rank 0 holds `run/.lock` until it exits). SIGTERM or SIGUSR1 (`kill`, `timeout`, torchrun,
SLURM's `--signal=USR1@90` before a time limit) stops the run at the end of the step it is on, with a checkpoint
of that step, and exits 128 + the signal's number: nothing trained is lost, and `--resume` continues exactly.
`train.init_from=CKPT` starts a new run from a checkpoint's weights instead (fresh optimizer, step 0):
fine-tuning, or a checkpoint converted from the authors' release.

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
import signal
import sys
import threading
import time
from copy import deepcopy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Config, add_config_args, config_from_args, config_to_dict, load_config, main_guard, save_config
from data import build_dataset
from diffusion import create_diffusion
from fileio import FolderInUse, atomic_save, hold_folder
from models import create_model, is_dcdit
from models.checkpoint_io import model_state, read_checkpoint
from models.dydit import flops_loss, flops_ratio, load_dcdit_weights, read_dcdit_checkpoint
from models.flops import dcdit_flops_coeffs
from models.routing import ratio_loss
from models.upcycle import (build_teacher, distillation_loss, freeze_embedders, load_dit_checkpoint,
                            reset_untouched_adam_state, upcycle_, upcycle_model_config)
from sampling import Sampler, class_grid, generate, load_vae_if_latent, save_grid
from tracking import Tracker, step_profiler
from visualize import chunking_viz


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


def ratio_target(cfg, step: int, n: Optional[float] = None) -> float:
    """Compression target N (model.downsample_factor, or a given stage's N), optionally ramped linearly from
    ratio_ramp_start over ratio_ramp_steps (§3.5); a stage whose N is below the ramp's start stays at its N."""
    n = cfg.model.downsample_factor if n is None else n
    if cfg.train.ratio_ramp_steps <= 0 or n <= cfg.train.ratio_ramp_start:
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


def load_init_weights(path: str, which: str) -> dict:
    """train.init_from: the state dict to start a new run from (EMA weights unless train.init_weights=model)."""
    ckpt = read_checkpoint(path, "train.init_from", TrainError, "a checkpoint of this repo")
    state, got = model_state(ckpt, use_ema=which == "ema")
    if state is None:
        raise TrainError(f"train.init_from {path}: {got}; expected a checkpoint with 'ema'/'model' weights")
    return state


def use_deterministic_kernels() -> None:
    """train.deterministic: the same losses on every rerun, GPUs included (resume is exact then, at some speed)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first handle
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def use_tf32_matmuls(enabled: bool) -> None:
    """train.tf32: fp32 matmuls on CUDA through TF32 tensor cores. What runs in fp32 under bf16 autocast is the
    router's arithmetic (§3.3) and de-chunking (§3.4); the cosine router's q/k projection over all L tokens is the
    largest of it, and off TF32 it runs as SIMT fp32 GEMMs (docs/performance.md, Results (CUDA)). Off by default,
    as the authors' training script; DiT's turns it on. cuDNN's own TF32 switch (on by default) is left alone."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)


# The signals that ask a run to stop: `kill` and `timeout` send SIGTERM, and so do torchrun and SLURM to their
# workers; SLURM's `--signal=USR1@SECONDS` sends SIGUSR1 that long before a job's time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal instead of dying of it; the training loop stops at the end of the step it is on, with
    a checkpoint of that step (a signal arriving mid-step would otherwise lose every step since the last one)."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        self.signum = signum

    @contextmanager
    def installed(self):
        """The handler for STOP_SIGNALS while inside (main thread only, as Python requires); the previous ones after."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore STOP_SIGNALS: a signal to the whole process group (SLURM, Ctrl-C's terminal
    group) must not kill a worker under the main process while it finishes its step and saves; the workers end with
    the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything a training loop needs, built once by prepare_run."""
    cfg: Config
    accelerator: Any
    logger: logging.Logger
    run_dir: str
    model: torch.nn.Module          # as trained (DDP-wrapped and/or compiled)
    raw: torch.nn.Module            # the bare model, for state dicts and the EMA
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    diffusion: Any
    data: Any                       # endless iterator of (x, y) micro-batches, resumable by step
    start_step: int
    tracker: Tracker
    teacher: Optional[torch.nn.Module] = None  # upcycling's frozen DiT during activation distillation
    dcdit_coeffs: Optional[tuple] = None       # DyDiT with flops_scope=model: the DC-DiT's a + b M + c M^2
    vae: Any = field(default=None, repr=False)  # decodes latents for the periodic images; loaded when first needed
    lock: Any = field(default=None, repr=False)  # rank 0's hold on the run folder, released when the process exits

    @property
    def dcdit(self) -> bool:
        return is_dcdit(self.cfg.model.name)

    @property
    def distill_steps(self) -> int:
        """Steps of activation distillation (§4.4) at the start of an upcycled run; 0 otherwise."""
        uc = self.cfg.upcycle
        return uc.distill_steps if uc.checkpoint else 0


def parse_args(argv=None) -> argparse.Namespace:
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
    return args


def resolve_config(args) -> tuple:
    """-> (cfg, resume checkpoint or None, run folder or None). A resumed run starts from its own saved config,
    which --config and overrides given now refine (e.g. train.max_steps to train longer)."""
    if not args.resume:
        cfg = config_from_args(args)
        sources = [k for k, v in (("train.init_from", cfg.train.init_from), ("upcycle.checkpoint",
                   cfg.upcycle.checkpoint), ("dydit.init_checkpoint", cfg.dydit.init_checkpoint)) if v]
        if len(sources) > 1:
            raise TrainError(f"{' and '.join(sources)} both set the initial weights; keep one")
        return cfg, None, None
    run_dir, ckpt_path = resolve_resume(args.resume)
    ckpt = load_checkpoint(ckpt_path)
    return load_config(args.config, args.overrides, base=ckpt["config"]), ckpt, run_dir


def build_model(cfg, ckpt, logger, device):
    """The model with its starting weights (fresh, init_from, upcycled or DyDiT-initialised), its frozen
    distillation teacher if any, and the DC-DiT FLOPs coefficients DyDiT's loss needs."""
    uc, dy, tc = cfg.upcycle, cfg.dydit, cfg.train
    resumed_step = int(ckpt["step"]) if ckpt is not None else 0
    # Upcycling (§4.4): the DiT checkpoint is read once; a fresh run takes its weights and fixes
    # model.pos_scale / model.cond_adaptor before the model is built; a run inside the warm-up needs the teacher.
    dit_ckpt = None
    if uc.checkpoint:
        if not is_dcdit(cfg.model.name):
            raise TrainError(f"upcycle.checkpoint is set but model.name {cfg.model.name!r} is not a DC-DiT; "
                             f"upcycling turns a DiT checkpoint into a DCDiT-* model")
        if ckpt is None or resumed_step < uc.distill_steps:
            dit_ckpt = load_dit_checkpoint(uc.checkpoint)
        if ckpt is None:
            for note in upcycle_model_config(cfg.model, dit_ckpt):
                logger.info(note)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = create_model(cfg.model, cfg.dydit)
    if ckpt is None and tc.init_from:
        model.load_state_dict(load_init_weights(tc.init_from, tc.init_weights), strict=True)
        logger.info(f"weights from {tc.init_from} ({tc.init_weights}); new optimizer, step 0")
    if ckpt is None and dy.enabled:
        if dy.init_checkpoint:
            state, which = read_dcdit_checkpoint(dy.init_checkpoint)
            gates = load_dcdit_weights(model, state, dy.init_checkpoint)
            logger.info(f"DyDiT fine-tuning (§4.5) from {dy.init_checkpoint} ({which} weights): every DC-DiT "
                        f"weight loaded strictly; {len(gates)} gate-router tensors keep their init (every gate on)")
        else:
            logger.info("DyDiT gates on a freshly initialised DC-DiT (dydit.init_checkpoint is empty; the paper "
                        "fine-tunes a trained DC-DiT)")
    teacher = None
    if uc.checkpoint:
        if ckpt is None:
            logger.info(upcycle_(model, dit_ckpt).summary(dit_ckpt))
        else:
            freeze_embedders(model)  # the weights come from our checkpoint; the optimizer must see the same list
        if dit_ckpt is not None and uc.distill_steps > 0:
            teacher = build_teacher(dit_ckpt, model).to(device)
            logger.info(f"activation distillation for steps [0, {uc.distill_steps}) from a frozen DiT teacher "
                        f"({uc.checkpoint}, patch {teacher.patch_size}); the ratio loss stays on during it so the "
                        f"router still learns its budget; then the diffusion loss")
    # dydit.flops_scope=model: the FLOPs loss prices the whole forward, so it needs the DC-DiT's a + b M + c M^2.
    coeffs = dcdit_flops_coeffs(model) if dy.enabled and dy.flops_scope == "model" else None
    return model, teacher, coeffs


def prepare_run(args) -> Run:
    """Config, process group, run folder, model, EMA, optimizer (restored on --resume), data, trackers."""
    cfg, ckpt, run_dir = resolve_config(args)
    tc = cfg.train
    if tc.deterministic:
        use_deterministic_kernels()
    use_tf32_matmuls(tc.tf32)
    accelerator = make_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if tc.global_batch_size % (world * tc.grad_accum_steps):
        raise TrainError(f"train.global_batch_size {tc.global_batch_size} is not divisible by world size {world} "
                         f"x train.grad_accum_steps {tc.grad_accum_steps}")
    micro = tc.global_batch_size // (world * tc.grad_accum_steps)
    if run_dir is None:  # made by rank 0, its path shared with the others
        holder = [new_run_dir(tc.results_dir, tc.exp_name or cfg.model.name.replace("/", "-"))
                  if accelerator.is_main_process else None]
        if world > 1:
            dist.broadcast_object_list(holder, src=0)
        run_dir = holder[0]
    lock = None
    if accelerator.is_main_process:  # before the log: a second trainer must not append to the first one's
        try:
            lock = hold_folder(run_dir, "run folder")
        except FolderInUse as e:
            raise TrainError(str(e)) from None
    logger = make_logger(run_dir, accelerator.is_main_process)
    logger.info(f"run folder {run_dir}; {world} process(es) on {device}; micro-batch {micro} x accum "
                f"{tc.grad_accum_steps} x world {world} = global {tc.global_batch_size}")

    model, teacher, coeffs = build_model(cfg, ckpt, logger, device)
    if accelerator.is_main_process:  # after build_model: upcycling may have fixed model fields
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        for stale in glob.glob(os.path.join(run_dir, "checkpoints", "*.tmp.*")):
            os.remove(stale)  # a checkpoint write interrupted by a crash; the previous checkpoint is intact
    ema = deepcopy(model).requires_grad_(False)
    logger.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    # The fused kernels apply AdamW's update in a few launches instead of several per parameter group: the same
    # algorithm, fewer kernels (on CUDA only, so CPU runs keep PyTorch's default implementation).
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay,
                            fused=True if tc.fused_adamw and device.type == "cuda" else None)
    start_step, wandb_id = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start_step, wandb_id = int(ckpt["step"]), ckpt.get("wandb_id")
        logger.info(f"resumed from step {start_step}")

    diffusion = create_diffusion(timestep_respacing=cfg.diffusion.timestep_respacing,
                                 noise_schedule=cfg.diffusion.noise_schedule, learn_sigma=cfg.model.learn_sigma,
                                 diffusion_steps=cfg.diffusion.diffusion_steps)
    dataset = build_dataset(cfg.data, expected_shape=(cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size))
    sampler = StepBatchSampler(len(dataset), tc.global_batch_size, rank, world, tc.seed, start_step, micro)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.num_workers > 0,
                        worker_init_fn=ignore_stop_signals if cfg.data.num_workers > 0 else None)
    logger.info(f"dataset: {len(dataset):,} items ({cfg.data.kind})")

    ema.to(device).eval()
    model, opt = accelerator.prepare(model, opt)
    if tc.compile:
        model = torch.compile(model)
    raw = accelerator.unwrap_model(model)
    model.train()
    tracker = Tracker(cfg, run_dir, accelerator.is_main_process, resume_id=wandb_id)
    return Run(cfg, accelerator, logger, run_dir, model, raw, ema, opt, diffusion, iter(loader), start_step, tracker,
               teacher, coeffs, lock=lock)


# ----------------------------------------------------------------------------- one step

@dataclass
class Losses:
    """The terms of one micro-batch's loss, and the routing statistics behind them."""
    total: torch.Tensor
    main: torch.Tensor            # diffusion loss, or block distillation during the upcycling warm-up
    ratio: torch.Tensor           # §3.5 (both stages' weighted losses for a two-stage model)
    flops: torch.Tensor           # DyDiT's (F_dyn / F_static - lambda)^2
    distilling: bool
    info: Any = None              # ChunkInfo of the forward (DC-DiT)


def step_losses(run: Run, x, y, step: int, fraction: float, n_target: float) -> Losses:
    """Loss of one micro-batch: diffusion (or distillation) + ratio loss + DyDiT's FLOPs loss."""
    cfg, device = run.cfg, run.accelerator.device
    t = torch.randint(0, run.diffusion.num_timesteps, (x.shape[0],), device=device)
    distilling = step < run.distill_steps
    infos = []

    def model_fn(x_t, ts, **kw):  # the diffusion loss calls the model; keep its routing statistics
        if not run.dcdit:
            return run.model(x_t, ts, **kw)
        out, info = run.model(x_t, ts, return_info=True, tail_drop=fraction, **kw)
        infos.append(info)
        return out

    if distilling:
        x_t = run.diffusion.q_sample(x, t, noise=torch.randn_like(x))
        drop = label_drop_ids(x.shape[0], cfg.model.class_dropout_prob, device)
        main, info = distillation_loss(run.model, run.teacher, x_t, t, y, drop, fraction)
        infos.append(info)
    else:
        main = run.diffusion.training_losses(model_fn, x, t, model_kwargs=dict(y=y))["loss"].mean()
    zero = torch.zeros((), device=device)
    ratio, flops, info = zero, zero, (infos[0] if infos else None)
    if run.dcdit:
        # The natural (pre-drop) decisions: multi-budget training must not teach the router to keep more tokens
        # to make up for the dropped ones.
        ratio = ratio_loss(info.router.natural_mask, info.router.prob, n_target, cfg.train.ratio_group_size)
        if info.stage1 is not None:  # the inner stage's own ratio loss, over its (stage-0 kept) tokens
            s1 = info.stage1
            n1 = ratio_target(cfg, step, cfg.model.stage1_downsample_factor)
            ratio = ratio + cfg.train.stage1_ratio_loss_weight / cfg.train.ratio_loss_weight * ratio_loss(
                s1.router.natural_mask, s1.router.prob, n1, cfg.train.ratio_group_size, valid=s1.valid)
    if cfg.dydit.enabled:  # §4.5: the gates' straight-through gradient pulls F_dyn / F_static to lambda
        flops = flops_loss(info.dydit, cfg.dydit.target_ratio, run.dcdit_coeffs)
    total = main + cfg.train.ratio_loss_weight * ratio + cfg.dydit.flops_loss_weight * flops
    return Losses(total, main, ratio, flops, distilling, info)


class Window:
    """Running sums over one logging window; `summary` reduces them over ranks into the logged metrics."""

    KEYS = ("loss", "diffusion", "distill", "ratio", "flops", "n", "n_distill", "grad_norm", "n_clip", "fraction",
            "n_steps")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.natural, self.run, self.flops_ratios, self.stage0 = [], [], [], []
        self.t0 = time.time()

    def add(self, losses: Losses, run: Run) -> None:
        s = self.sums
        s["loss"] += losses.total.item()
        s["distill" if losses.distilling else "diffusion"] += losses.main.item()
        s["ratio"] += losses.ratio.item()
        s["flops"] += losses.flops.item()
        s["n"] += 1
        s["n_distill"] += int(losses.distilling)
        if losses.info is not None:
            info = losses.info
            L = info.router.prob.shape[1]
            # L / M_b before dropping (a two-stage model: of the inner stage's natural decisions, so its overall
            # compression) and as the inner blocks ran.
            natural = info.router.natural_mask if info.stage1 is None else info.stage1.router.natural_mask
            self.natural.append(L / natural.sum(1).float())                          # (B,)
            self.run.append(L / info.kept.float())                                   # (B,)
            if info.stage1 is not None:
                self.stage0.append(L / info.router.natural_mask.sum(1).float())     # (B,) stage 0 alone
            if run.cfg.dydit.enabled:
                self.flops_ratios.append(flops_ratio(losses.info.dydit, run.dcdit_coeffs).detach().float())

    def add_step(self, grad_norm: Optional[float], fraction: float) -> None:
        self.sums["n_steps"] += 1
        self.sums["fraction"] += fraction
        if grad_norm is not None:
            self.sums["grad_norm"] += grad_norm
            self.sums["n_clip"] += 1

    def summary(self, run: Run, step: int) -> dict:
        acc, tc = run.accelerator, run.cfg.train
        vals = acc.reduce(torch.tensor([float(self.sums[k]) for k in self.KEYS], device=acc.device), reduction="sum")
        tot = dict(zip(self.KEYS, vals.tolist()))
        n, n_distill, world = max(tot["n"], 1), tot["n_distill"], acc.num_processes
        steps, elapsed = tot["n_steps"] / world, time.time() - self.t0
        log = {"step": step, "loss": tot["loss"] / n}
        # Each objective averaged over the micro-steps that used it (a window may straddle the switch).
        if n_distill < tot["n"] or not run.distill_steps:
            log["diffusion_loss"] = tot["diffusion"] / max(tot["n"] - n_distill, 1)
        if n_distill > 0:
            log["distill_loss"] = tot["distill"] / n_distill
        if tot["n_clip"] > 0:
            log["grad_norm"] = tot["grad_norm"] / tot["n_clip"]  # before clipping
        log.update(steps_per_sec=steps / elapsed, images_per_sec=steps * tc.global_batch_size / elapsed,
                   lr=run.opt.param_groups[0]["lr"])
        if run.dcdit and self.natural:  # empty when every step of the window was skipped (nan_policy=skip), on all ranks
            natural = acc.gather(torch.cat(self.natural)).float()
            ran = acc.gather(torch.cat(self.run)).float()
            log.update(ratio_loss=tot["ratio"] / n, compression_gmean=natural.log().mean().exp().item(),
                       compression_std=natural.std().item() if natural.numel() > 1 else 0.0,
                       compression_min=natural.min().item(), compression_max=natural.max().item(),
                       compression_run_gmean=ran.log().mean().exp().item(),
                       tail_drop=tot["fraction"] / max(tot["n_steps"], 1))
            if self.stage0:
                log["compression_stage0_gmean"] = acc.gather(torch.cat(self.stage0)).float().log().mean().exp().item()
        if run.cfg.dydit.enabled and self.flops_ratios:
            log.update(flops_loss=tot["flops"] / n, flops_ratio=acc.gather(torch.cat(self.flops_ratios)).mean().item())
        return log


# ----------------------------------------------------------------------------- checkpoints and images

def save_checkpoint(run: Run, step: int) -> None:
    """{model, ema, opt, config, step, rng, wandb_id}, written atomically by rank 0 (refused if not finite)."""
    acc, tc = run.accelerator, run.cfg.train
    if not check_ranks_in_sync(run.raw, acc):
        raise TrainError(f"ranks hold different weights at step {step}; not saving a checkpoint")
    if acc.num_processes > 1:
        run.logger.info(f"step {step}: all {acc.num_processes} ranks hold identical weights")
    if acc.is_main_process:
        path = os.path.join(run.run_dir, "checkpoints", f"{step:07d}.pt")
        previous = latest_checkpoint(run.run_dir) or "none"
        if not all(torch.isfinite(p).all() for p in run.raw.parameters()):
            raise TrainError(f"weights are not finite at step {step}; not saving them (last good checkpoint: "
                             f"{previous})")
        try:
            atomic_save({"model": run.raw.state_dict(), "ema": run.ema.state_dict(), "opt": run.opt.state_dict(),
                         "config": config_to_dict(run.cfg), "step": step, "rng": {"torch": torch.get_rng_state()},
                         "wandb_id": run.tracker.wandb_id}, path)
        except OSError as e:
            raise TrainError(f"could not write checkpoint {path}: {e.strerror or e}; the previous checkpoint "
                             f"{previous} is intact") from None
        run.logger.info(f"saved checkpoint {path}")
        if tc.keep_last_ckpts > 0:
            for old in sorted(glob.glob(os.path.join(run.run_dir, "checkpoints", "[0-9]" * 7 + ".pt")))[:-tc.keep_last_ckpts]:
                os.remove(old)
    acc.wait_for_everyone()


def save_images(run: Run, step: int) -> dict:
    """EMA samples (one per class, CFG) as a labelled grid and, for DC-DiT, the chunking visualisation of the
    same sampling run -> {name: path} in the run folder."""
    cfg, device = run.cfg, run.accelerator.device
    if run.vae is None:
        run.vae = load_vae_if_latent(cfg, device)
    labels = torch.arange(min(cfg.model.num_classes, 16), device=device)
    sampler = Sampler(run.ema, cfg, cfg.sample.cfg_scale, keep_maps=run.dcdit)
    res = generate(run.ema, cfg, labels, seed=cfg.sample.seed, device=device, sampler=sampler, progressive=run.dcdit,
                   vae=run.vae)
    images, steps = res if run.dcdit else (res, None)
    order, per_row, row_labels = class_grid(labels.tolist(), nrow=int(math.ceil(len(labels) ** 0.5)))
    paths = {"samples": os.path.join(run.run_dir, f"samples_{step:07d}.png")}
    save_grid(images[order], paths["samples"], nrow=per_row, row_labels=row_labels)
    if run.dcdit:
        paths["chunking"] = os.path.join(run.run_dir, f"chunking_{step:07d}.png")
        chunking_viz(steps, sampler.records, cfg, paths["chunking"], num_samples=min(4, len(labels)), vae=run.vae,
                     device=device)
    return paths


# ----------------------------------------------------------------------------- main

def main(argv=None):
    run = prepare_run(parse_args(argv))
    cfg, tc, acc, logger = run.cfg, run.cfg.train, run.accelerator, run.logger
    window = Window()
    first, last = tc.profile_steps or (0, 0)
    bar = tqdm(total=tc.max_steps, initial=run.start_step, disable=not acc.is_main_process, desc="train",
               dynamic_ncols=True)
    stop, stopping = StopRequest(), False
    with stop.installed(), step_profiler(first, last, os.path.join(run.run_dir, "profile"),
                                         f"rank{acc.process_index}", start=run.start_step) as profiler:
        for step in range(run.start_step, tc.max_steps):
            if run.distill_steps and step == run.distill_steps:
                run.teacher = None
                logger.info(f"step {step}: activation distillation done; diffusion loss from here on (fresh Adam "
                            f"state for {reset_untouched_adam_state(run.opt)} parameter tensors the distillation "
                            f"loss never reached)")
            torch.manual_seed(step_seed(tc.seed, step, acc.process_index))
            fraction = multi_budget_fraction(cfg, step) if run.dcdit else 0.0
            n_target = ratio_target(cfg, step)
            grad_norm = None
            for _ in range(tc.grad_accum_steps):
                x, y = next(run.data)
                x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
                with acc.accumulate(run.model), acc.autocast():
                    losses = step_losses(run, x, y, step, fraction, n_target)
                    # Decided on all ranks together: a rank that skipped or stopped alone would hang the others.
                    # One reduce and one host sync for both questions: a non-finite loss, a stop signal.
                    votes = torch.stack([(~torch.isfinite(losses.total.detach())).float(),
                                         torch.tensor(float(stop.signum > 0), device=acc.device)])  # (2,)
                    bad, stop_votes = acc.reduce(votes, reduction="sum").tolist()
                    stopping = stopping or stop_votes > 0
                    if bad > 0:
                        msg = (f"non-finite loss at step {step + 1} on {int(bad)} rank(s); last good "
                               f"checkpoint: {latest_checkpoint(run.run_dir) or 'none'}")
                        if tc.nan_policy == "stop":
                            raise TrainError(msg + "; stopping (train.nan_policy=stop)")
                        logger.info(msg + "; skipping the step (train.nan_policy=skip)")
                        run.opt.zero_grad(set_to_none=True)
                        continue
                    acc.backward(losses.total)
                    if acc.sync_gradients:
                        grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), tc.grad_clip))
                    run.opt.step()
                    run.opt.zero_grad(set_to_none=True)
                window.add(losses, run)
            window.add_step(grad_norm, fraction)
            update_ema(run.ema, run.raw, tc.ema_decay)
            profiler.step()
            done = step + 1
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.max_steps:
                log = window.summary(run, done)
                logger.info(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in log.items()}))
                bar.set_postfix(loss=f"{log['loss']:.4f}")
                run.tracker.log(log, done)
                window = Window()
            if done % tc.ckpt_every == 0 or done == tc.max_steps or stopping:
                save_checkpoint(run, done)
            if stopping:
                name = signal.Signals(stop.signum).name if stop.signum else "a stop signal to another rank"
                logger.info(f"step {done}: stopped by {name} with a checkpoint of this step; continue with "
                            f"--resume {run.run_dir}")
                break
            if cfg.logging.image_every > 0 and done % cfg.logging.image_every == 0 and acc.is_main_process:
                run.tracker.log_images(save_images(run, done), done)
    bar.close()
    if tc.profile_steps and acc.is_main_process:
        logger.info(f"profiler trace of steps {first}-{last}: {os.path.join(run.run_dir, 'profile')} "
                    f"(tensorboard --logdir there, or open the .pt.trace.json in Perfetto)")
    if not stopping:
        logger.info("done")
    run.tracker.close()
    # end_training destroys the process group at once; ranks meet first, so none tears down while the main process
    # still closes its tracker (sample_ddp.py saw gloo abort a rank that left early).
    acc.wait_for_everyone()
    acc.end_training()
    if run.lock is not None:
        run.lock.close()  # the folder is free for the next trainer, also when main() is called in-process
    if stopping:  # every rank the same status, whichever received the signal
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))


if __name__ == "__main__":
    main_guard(main)()
