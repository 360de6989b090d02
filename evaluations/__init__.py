"""ADM-faithful FID, sFID, Inception Score, Precision and Recall in PyTorch (no TensorFlow).

    python evaluations/make_reference.py digits ref.npz --inception-weights W
    python evaluations/evaluate.py ref.npz samples.npz --inception-weights W --out metrics.json

Modules: inception.py (the TF FID network in its three PyTorch weight formats), images.py (.npz and PNG
inputs), activations.py (batched extraction with an .npz cache), metrics.py (the formulas), and the
two scripts. docs/evaluation.md says which weight format gives which metric.
"""
import sys

from evaluations.activations import Activations, compute_activations
from evaluations.images import ImageInputError, open_images
from evaluations.inception import WeightsUnavailable, load_inception
from evaluations.metrics import frechet_distance, gaussian_statistics, inception_score, precision_recall

__all__ = ["Activations", "ImageInputError", "WeightsUnavailable", "compute_activations", "frechet_distance",
           "gaussian_statistics", "inception_score", "load_inception", "open_images", "precision_recall", "run_cli"]


def run_cli(main, argv=None):
    """Run a script's main; a user error (missing weights, bad input) is one `error: ...` line and exit 2."""
    try:
        return main(argv)
    except Exception as e:
        if getattr(e, "user_error", False):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raise
