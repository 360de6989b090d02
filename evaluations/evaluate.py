"""Score a sample batch against a reference batch with ADM's metrics, in PyTorch.

    python evaluations/evaluate.py REF.npz SAMPLE.npz [--inception-weights PATH] [--batch-size 64]
        [--device cuda|cpu] [--out metrics.json] [--fid-sqrt sqrtm|eigh] [--no-cache]

REF and SAMPLE are ADM-style .npz files (`arr_0` uint8 (N, H, W, 3); a reference's `mu, sigma, mu_s,
sigma_s` are used as stored) or folders of PNGs. Prints Inception Score, FID, sFID, Precision and
Recall in the order of ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) and writes
them to JSON. A metric the weights cannot give (IS without a classifier layer) is null, with a note.
"""
import argparse
import json
import sys

from evaluations import add_network_args, check_network_args, run_cli
from evaluations.activations import compute_activations
from evaluations.images import ImageInputError, open_images, read_reference_statistics
from evaluations.inception import POOL_DIM, SPATIAL_DIM, load_inception
from evaluations.metrics import (PR_NEIGHBOURS, SQRT_METHODS, frechet_distance, gaussian_statistics, inception_score,
                                 precision_recall)

METRIC_NAMES = ("Inception Score", "FID", "sFID", "Precision", "Recall")  # ADM's printing order


def evaluate(ref, sample, inception_weights=None, batch_size=64, device="cpu", use_cache=True, net=None,
             fid_sqrt="sqrtm"):
    """ADM's five metrics of `sample` against `ref` (paths to .npz files or PNG folders).

    Returns {"metrics": {name: float or None} in ADM's order, "notes": [str], plus what was compared}.
    `net` reuses an already loaded network (from load_inception) instead of loading `inception_weights`;
    `fid_sqrt` picks how tr sqrt(sigma1 sigma2) is computed (metrics.frechet_distance).
    """
    net = net if net is not None else load_inception(inception_weights, device)
    ref_images, sample_images = open_images(ref), open_images(sample)
    for images in (ref_images, sample_images):
        if len(images) <= PR_NEIGHBOURS:
            raise ImageInputError(f"{images.name}: {len(images)} images; expected at least {PR_NEIGHBOURS + 1} "
                                  f"(Precision/Recall need {PR_NEIGHBOURS} neighbours; FID wants thousands)")
    ref_acts = compute_activations(net, ref_images, batch_size, device, use_cache, desc="reference")
    sample_acts = compute_activations(net, sample_images, batch_size, device, use_cache, desc="samples")

    notes = []
    dims = {"fid": POOL_DIM, "sfid": SPATIAL_DIM}
    stored = read_reference_statistics(ref, dims)  # ADM uses a reference's stored statistics as they are
    stored_sample = read_reference_statistics(sample, dims)  # and applies the same rule to the samples
    for path, found in ((ref, stored), (sample, stored_sample)):
        notes += [f"{'FID' if metric == 'fid' else 'sFID'}: statistics read from {path}" for metric in found]
    ref_fid = stored.get("fid") or gaussian_statistics(ref_acts.pool)
    ref_sfid = stored.get("sfid") or gaussian_statistics(ref_acts.spatial)
    sample_fid = stored_sample.get("fid") or gaussian_statistics(sample_acts.pool)
    sample_sfid = stored_sample.get("sfid") or gaussian_statistics(sample_acts.spatial)

    if sample_acts.logits is not None:
        score = inception_score(sample_acts.logits)
    else:
        score = None
        notes.append(f"Inception Score: null, the weights ({net.weights_format}) have no 1008-way classifier; "
                     "use torch-fidelity's .pth or NVIDIA's inception-2015-12-05.pt for IS")
    precision, recall = precision_recall(ref_acts.pool, sample_acts.pool, device=device)
    if fid_sqrt != "sqrtm":
        notes.append(f"FID/sFID: tr sqrt(sigma1 sigma2) by {fid_sqrt}, not ADM's scipy sqrtm (equal up to rounding)")
    fid = frechet_distance(*sample_fid, *ref_fid, method=fid_sqrt)
    sfid = frechet_distance(*sample_sfid, *ref_sfid, method=fid_sqrt)
    metrics = dict(zip(METRIC_NAMES, (score, fid, sfid, precision, recall)))
    return {"metrics": metrics, "notes": notes, "ref": ref, "sample": sample, "num_ref": len(ref_images),
            "num_sample": len(sample_images), "inception_weights": net.weights_path,
            "weights_format": net.weights_format}


def format_metrics(result):
    """ADM's `Name: value` lines, then the notes."""
    lines = [f"{name}: {'null' if value is None else value}" for name, value in result["metrics"].items()]
    return "\n".join(lines + [f"note: {note}" for note in result["notes"]])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="reference batch: .npz with arr_0 (and optionally mu, sigma, mu_s, sigma_s) "
                                    "or a folder of PNGs")
    parser.add_argument("sample", help="sample batch: .npz with arr_0 or a folder of PNGs")
    add_network_args(parser)
    parser.add_argument("--out", default=None, help="JSON file for the metrics (default: none)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write activation caches")
    parser.add_argument("--fid-sqrt", choices=SQRT_METHODS, default="sqrtm",
                        help="sqrtm: ADM's scipy.linalg.sqrtm (default; ~1 min per distance on 2 cores); "
                             "eigh: symmetric eigendecompositions, ~1 s, equal up to rounding")
    args = parser.parse_args(argv)
    check_network_args(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    result = evaluate(args.ref, args.sample, args.inception_weights, args.batch_size, args.device,
                      use_cache=not args.no_cache, fid_sqrt=args.fid_sqrt)
    print(format_metrics(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
