"""What a reproduction trains: the report's constants, the run sizes (Plan), the tables and the runs each needs,
and the baselines' depths picked from exact parameter and FLOP counts (Table 1 in miniature)."""
import dataclasses
import math
import os
import time

from models.flops import build_model, count_params, dcdit_flops_coeffs, forward_flops, quadratic


# The repository: train.py and configs/ are found from here.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
TRAIN_ORDER = ("dcdit", "random", "isoparam", "isoflop", "twostage", "teacher", "upcycle", "distill", "distill_long",
               "dydit")
# Table 3 (§4.4): upcycled runs are scored at 20K, 50K and 100K steps, 5%, 12.5% and 25% of the 400K steps a
# from-scratch DC-DiT trains; "+ Distilled" spends its first 5K steps (1.25%) on activation distillation.
UPCYCLE_BUDGETS = (0.05, 0.125, 0.25)
DISTILL_SHARE = 5 / 400
# --distill-ablation: one more Table 3 run whose distillation warm-up is this many times the paper's share, to test
# whether the paper's share is too short for a scaffold trained from nothing (docs/reproduction.md).
DISTILL_ABLATION_SCALE = 4
# Table 3's teacher trains TEACHER_SHARE x the from-scratch steps. The paper's teacher, the public DiT-XL/2, trained
# 7M steps, 17.5 x the DC-DiT's 400K; at the DC-DiT's own steps the latent teacher (a DiT/2 of just the DC-DiT's inner
# blocks) was recognised on 88% of its samples, under the report's bar for a competent baseline (docs/reproduction.md).
TEACHER_SHARE = 2
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


class TimeBudgetSpent(RuntimeError):
    """--minutes ran out: the invocation stopped where a rerun of the same command continues (not an error: the
    command exits 3 rather than main_guard's 2, so a loop can tell the two apart)."""


def check_deadline(deadline, what: str) -> None:
    """Raise TimeBudgetSpent once time.monotonic() passes `deadline` (None: no budget) before `what` starts."""
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeBudgetSpent(f"the --minutes budget is spent before {what}; everything done so far is saved, and "
                              "the same command continues from there")


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


def distill_ablation_steps(plan: Plan) -> int:
    """The --distill-ablation run's warm-up: DISTILL_ABLATION_SCALE x the paper's share, in steps."""
    return DISTILL_ABLATION_SCALE * distill_steps(plan)


def teacher_steps(plan: Plan) -> int:
    return plan.steps * TEACHER_SHARE


def dydit_steps(plan: Plan) -> int:
    """Table 4's fine-tuning steps: DYDIT_SHARE of the from-scratch run, at least one."""
    return max(1, round(DYDIT_SHARE * plan.steps))


def run_specs(depths: dict, plan: Plan, dcdit_cfg, configs: tuple = (DCDIT_CONFIG, DIT_CONFIG), data: tuple = (),
              two_stage: tuple = None, tables: tuple = tuple(TABLES), distill_ablation: bool = False) -> dict:
    """key -> (label, config, overrides) of the training runs of `tables` (every table's by default); dcdit_cfg is the
    DC-DiT's loaded config (the teacher's depth and DyDiT's learning rate follow it); `data` adds
    the latent space's data overrides, `two_stage` (overrides, info from two_stage_spec) one more run: the
    two-stage DC-DiT, and `distill_ablation` another with Table 3 (its upcycled + distilled run with a longer
    warm-up). Overrides may name another run's final checkpoint as {key} (the teacher an upcycled run
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
        # is DC-DiT-XL's, trained longer than the DC-DiT as DiT-XL/2 was (TEACHER_SHARE).
        "teacher": (f"DiT/2 teacher (depth {teacher_depth})", dit,
                    steps(teacher_steps(plan), every) + [f"model.depth={teacher_depth}"]),
        "upcycle": ("DC-DiT upcycled", dcdit, upcycle + ["upcycle.distill_steps=0"]),
        "distill": ("DC-DiT upcycled + distilled", dcdit,
                    upcycle + [f"upcycle.distill_steps={distill_steps(plan)}"]),
        "distill_long": (f"DC-DiT upcycled + distilled, {DISTILL_ABLATION_SCALE} x the warm-up", dcdit,
                         upcycle + [f"upcycle.distill_steps={distill_ablation_steps(plan)}"]),
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
    if distill_ablation and "3" not in tables:
        raise ReproduceError("--distill-ablation adds a Table 3 run; add 3 to --tables")
    if distill_ablation and distill_ablation_steps(plan) >= budgets[-1]:
        raise ReproduceError(f"--distill-ablation: its warm-up of {distill_ablation_steps(plan)} steps leaves no "
                             f"diffusion training before the last budget ({budgets[-1]} steps)")
    wanted = {k for t in tables for k in TABLES[t]} | ({"twostage"} if two_stage is not None else set())
    wanted |= {"distill_long"} if distill_ablation else set()
    return {k: specs[k] for k in TRAIN_ORDER if k in wanted}
