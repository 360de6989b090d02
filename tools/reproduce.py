"""The paper's claims, tested small on the bundled MNIST digits: one command, one report.

    python tools/reproduce.py --out reports/mnist --tables 1 2   # ~1 hour on a 2-core CPU
    python tools/reproduce.py --out reports/digits_latent --space latent   # the paper's latent setting in miniature
    python tools/reproduce.py --out /tmp/r --quick           # a few minutes: every section, tiny sizes
    python tools/reproduce.py --out /tmp/t2 --tables 2       # one table alone: only the runs it needs
    python tools/reproduce.py --out reports/digits_latent --space latent --status   # how far each run has got
    python tools/reproduce.py --out reports/digits_latent --space latent --jobs 2   # two runs at a time
    python tools/reproduce.py --out reports/digits_latent --space latent --minutes 60   # an hour, then stop; rerun

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
DC-DiT, the teacher and the two upcycled runs, `--tables 4` the DC-DiT and its DyDiT fine-tune; `--distill-ablation`
adds a third upcycled run to Table 3, distilled 4 x as long as the paper's share.) Then samples
every model from the same per-image noise and labels, scores FID against real digits (the TF
Inception network when its weights are installed, else flattened pixels, labelled as such), and measures
where the learned boundaries land, how compression follows the timestep and what tail dropping and Lite-CFG
cost (an FID-vs-GFLOPs figure with the DiT rows).
Writes OUT/REPORT.md, OUT/results.json and PNG figures; training runs go to OUT/work (not meant for git).
A rerun skips the runs already trained and resumes a half-finished one, so a crash loses at most a
checkpoint interval, and a stop (Ctrl-C, kill, --minutes) nothing: the runs save the step they are on. Every
number in the report is computed by this script from the runs it just did.

This file is the command; its pieces are in tools/reproduction/: plan.py (what is trained: the tables, their runs,
the baselines' depths), runs.py (training them, --jobs, --status), scoring.py (sample sets, FID, FLOPs, boundary
maps), figures.py and report.py (the claims judged, REPORT.md).
"""
import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from config import load_config, main_guard
from fileio import atomic_write
from models.flops import count_params
from sampling import load_model_for_sampling, load_vae_if_latent
from tools.reproduction.figures import plot_compression, plot_enrichment, plot_pareto, plot_samples
from tools.reproduction.plan import (AGREEMENT_PAIRS, DCDIT_CONFIG, DIT_CONFIG, DYDIT_LR_SCALE, DYDIT_TARGET,
                                     FRACTIONS, FULL, FULL_LATENT, LATENT_CONFIGS, LITE_CFG_FRACTIONS, PAPER_CONFIG,
                                     QUICK, RECOGNITION_BAR, ROOT, SEED, TABLES, ReproduceError, TimeBudgetSpent,
                                     budget_steps, distill_ablation_steps, distill_steps, dydit_steps, matched_depths,
                                     run_specs, scaffold_share, teacher_steps, two_stage_spec)
from tools.reproduction.report import judge, rerender, verdict, write_report
from tools.reproduction.runs import prepare_latent, print_status, train_all
from tools.reproduction.scoring import Scorer, agreement, boundary_maps, compression_by_step, zero_output


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
    parser.add_argument("--distill-ablation", action="store_true",
                        help="with Table 3, also train and score an upcycled + distilled run whose distillation "
                             "warm-up is 4 x the paper's share of the steps (scored at the same budgets)")
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
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after this many minutes (training runs save the step they are on; scoring stops "
                             "before its next sample set) and exit 3; the same command continues from there")
    parser.add_argument("--rerender", action="store_true",
                        help="only rewrite OUT/REPORT.md from the numbers in OUT/results.json (after a change to the "
                             "report's wording; nothing is trained, sampled or scored)")
    args = parser.parse_args(argv)
    if args.minutes is not None and not args.minutes > 0:
        raise ReproduceError(f"--minutes must be > 0, got {args.minutes}")
    deadline = None if args.minutes is None else time.monotonic() + 60.0 * args.minutes
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
    specs = run_specs(depths, plan, dcdit_cfg, configs, data, two_stage, tuple(args.tables), args.distill_ablation)
    if args.status:
        return {"runs": print_status(work, specs, latent)}
    start = time.perf_counter()
    trained = train_all(specs, work, args.jobs, deadline)
    phases[f"training ({len(specs)} models), this invocation"] = time.perf_counter() - start
    phases.update({f"training {key} (from its log)": t["seconds"] for key, t in trained.items()})

    start = time.perf_counter()
    scorer = Scorer(args.space, dcdit_cfg.model.input_size, plan, work, args.features, phases, deadline)
    phases["reference features"] = time.perf_counter() - start

    models, sets, compression, enrichment, tail, by_key, zero_row = {}, {}, {}, {}, [], {}, None
    lite, upcycling, dit_baseline = [], [], None
    viz_path = os.path.join(out, "boundary_maps.png")

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
            row, s = scorer.score(model, cfg, f"{key} f={f:g}", trained[key]["ckpt"], f, vae=vae)
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
                row, _ = scorer.score(model, cfg, f"dcdit lite-cfg uncond f={u:g}", trained[key]["ckpt"], 0.0, u,
                                      vae=vae)
                row.pop("ratio")
                lite.append(dict(row, uncond_f=u))
        if key in ("upcycle", "distill", "distill_long") or (key == "dcdit" and "3" in args.tables):
            for b in budgets:  # Table 3: each run at each budget (the upcycled runs end at the last one)
                if key != "dcdit" and b == budgets[-1]:
                    row = dict(models[key])
                else:
                    path = budget_checkpoint(key, b)
                    m, c = load_model_for_sampling(SimpleNamespace(config=None, overrides=[]), path)
                    row, _ = scorer.score(m, c, f"{key} at step {b}", path, vae=vae)
                upcycling.append({"run": "scratch" if key == "dcdit" else key, "steps": b, "fid": row["fid"],
                                  "fid_sd": row["fid_sd"], "recognised": row["recognised"],
                                  "tflops": row["tflops"], "compression": row["compression"]})
        if key == "teacher":  # Table 3's DiT row: the teacher's DiT/2 at the from-scratch steps (DiT-XL/2 at 400K)
            path = budget_checkpoint(key, plan.steps)
            m, c = load_model_for_sampling(SimpleNamespace(config=None, overrides=[]), path)
            row, _ = scorer.score(m, c, f"{key} at step {plan.steps}", path, vae=vae)
            dit_baseline = {"label": f"DiT/2 baseline (depth {c.model.depth})", "steps": plan.steps,
                            "params": count_params(m), "fid": row["fid"], "fid_sd": row["fid_sd"],
                            "recognised": row["recognised"], "tflops": row["tflops"], "compression": row["compression"]}
        if key == "isoparam":  # the same seeds through a DiT that predicts nothing: the no-learning reference
            row, s = scorer.score(zero_output(model), cfg, "zero-output DiT", trained[key]["ckpt"] + "#zero output",
                                  vae=vae)
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
           "git": _git_head(), "date": time.strftime("%Y-%m-%d"), "features": scorer.feature_label,
           "cfg_scale": dcdit_cfg.sample.cfg_scale, "depths": {k: v for k, v in depths.items() if k != "candidates"},
           "floor": scorer.floor, "classifier_accuracy": scorer.classifier_accuracy, "space": args.space,
           "autoencoder": autoencoder,
           "configs": list(configs), "models": models, "compression": compression,
           "enrichment": enrichment, "tail_drop": tail, "phases": phases, "recipe": recipe,
           "two_stage": two_stage[1] if two_stage else None, "lite_cfg": lite, "upcycling": upcycling,
           "budgets": list(budgets), "distill_steps": distill_steps(plan), "teacher_steps": teacher_steps(plan),
           "distill_ablation_steps": distill_ablation_steps(plan) if args.distill_ablation else None,
           "dit_baseline": dit_baseline,
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
        print(f"  [{verdict(held)}] {claim}: {evidence}")
    return res


def main(argv=None):
    """main_impl with one-line errors (exit 2); a spent --minutes budget is a stop, not an error: exit 3."""
    try:
        return main_guard(main_impl)(argv)
    except TimeBudgetSpent as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
