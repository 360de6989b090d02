"""The five ADM metrics computed from Inception activations: FID, sFID, IS, Precision, Recall.

Semantics follow openai/guided-diffusion `evaluations/evaluator.py` (the evaluator behind the ADM, DiT
and DC-DiT tables), so numbers are comparable with the literature:
- Frechet distance: `scipy.linalg.sqrtm` of sigma1 @ sigma2; when the result is not finite, 1e-6 is added
  to both diagonals and the root is taken again; a complex root whose diagonal has an imaginary part
  above 1e-3 is an error, otherwise its real part is used.
- Inception Score: softmax of the bias-free logits, splits of 5000 in the given order (no shuffling),
  the mean of the per-split scores (ADM reports no standard deviation).
- Precision / Recall (Kynkaanniemi et al. 2019 as adapted by ADM): k = 3 nearest neighbours with the
  point itself counted as neighbour 0, squared Euclidean distances computed in fp16 and recomputed in
  fp32 for any block with a non-finite value, blocks of 10000 x 10000.
"""
import warnings

import numpy as np
import scipy.linalg
import torch

FID_EPS = 1e-6  # diagonal offset of ADM's retry when sqrtm(sigma1 sigma2) is not finite
IMAG_ATOL = 1e-3  # largest imaginary part tolerated on the diagonal of the matrix root
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3  # k of the k-NN manifold; neighbour 0 is the point itself
PR_BATCH_SIZE = 10000  # row and column block of the distance matrix, as in ADM
SQRT_METHODS = ("sqrtm", "eigh")  # ADM's scipy sqrtm; a fast symmetric equivalent


# --------------------------------------------------------------------------------------------
# Frechet distance (FID on pool_3, sFID on mixed_6/conv)
# --------------------------------------------------------------------------------------------

def gaussian_statistics(activations):
    """(N, D) activations -> mean (D,) and covariance (D, D) in float64 (np.cov, rows are samples)."""
    acts = np.asarray(activations, dtype=np.float64)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"gaussian_statistics: got activations of shape {acts.shape}; "
                         "expected (N, D) with N >= 2 to estimate a covariance")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def _sqrtm(matrix):
    """scipy.linalg.sqrtm as ADM calls it (`disp=False`, which only silences scipy's accuracy print).

    SciPy 1.16 deprecated `disp` (removal planned for 1.18) without changing the root itself, so the
    deprecation warning is silenced and a SciPy without the argument is called plainly. SciPy 1.17 returns
    the root of a 1 x 1 matrix alone even with `disp=False` (no error estimate), so both forms are accepted.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out = scipy.linalg.sqrtm(matrix, disp=False)
    except TypeError:
        return scipy.linalg.sqrtm(matrix)
    return out[0] if isinstance(out, tuple) else out


def _trace_sqrt_product_eigh(sigma1, sigma2):
    """tr sqrt(sigma1 sigma2) from the eigenvalues of sigma1^1/2 sigma2 sigma1^1/2 (symmetric, same spectrum).

    Two symmetric eigendecompositions (about 1 s at 2048-d) instead of a Schur-based sqrtm (about 50 s
    on two cores); equal to ADM's value up to rounding for valid covariances. Eigenvalues below 0 are
    rounding noise and count 0, as the real part of their imaginary roots does in ADM.
    """
    evals, evecs = np.linalg.eigh(sigma1)  # (D,), (D, D)
    root1 = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T  # (D, D) sigma1^1/2
    middle = root1 @ sigma2 @ root1  # (D, D) symmetric PSD
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    """ADM: tr sqrtm(sigma1 sigma2), the 1e-6 diagonal retry, the imaginary-diagonal check."""
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product, e.g. fewer samples than feature dimensions: ADM's retry.
        warnings.warn(f"frechet_distance: sqrtm(sigma1 sigma2) is not finite; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > IMAG_ATOL:
            raise ValueError(f"frechet_distance: sqrt(sigma1 sigma2) has an imaginary diagonal of {imag:.3g}; "
                             f"expected below {IMAG_ATOL} (statistics are not valid covariances?)")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=FID_EPS, method="sqrtm"):
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).

    method "sqrtm" is ADM's numerics (the default, for numbers to compare with papers); "eigh" is the
    fast symmetric route for quick checks on small machines.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: means have shapes {mu1.shape} and {mu2.shape}; expected equal shapes "
                         "(reference statistics from a different feature layer?)")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"frechet_distance: covariances have shapes {sigma1.shape} and {sigma2.shape}; expected "
                         f"both ({mu1.shape[0]}, {mu1.shape[0]}) to match the means")
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"frechet_distance: method={method!r}; expected one of {SQRT_METHODS}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_to_activations(mu1, sigma1, activations):
    """frechet_distance(mu1, sigma1, *gaussian_statistics(activations), method="eigh"), without building sigma2
    when there are fewer activations than feature dimensions.

    With X the (N, D) centred activations, sigma2 = X^T X / (N-1), and sigma1^1/2 sigma2 sigma1^1/2 has the same
    non-zero eigenvalues as the (N, N) matrix X sigma1 X^T / (N-1) (AB and BA share them, with A = X sigma1^1/2 and
    B = its transpose): one (N, D) x (D, D) product and an N x N eigendecomposition replace two D x D ones. At
    N = 500, D = 2048 that is the same number up to rounding for a fraction of the time, which is what a bootstrap
    spread of many small sample sets costs. N - 1 >= D has no low-rank shortcut and takes the D x D route.
    """
    acts = np.asarray(activations, dtype=np.float64)
    mu1, sigma1 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_2d(np.asarray(sigma1, np.float64))
    if acts.ndim != 2 or acts.shape[0] < 2 or acts.shape[1] != mu1.shape[0]:
        raise ValueError(f"frechet_distance_to_activations: activations of shape {acts.shape}; expected (N, "
                         f"{mu1.shape[0]}) with N >= 2, the reference statistics' dimension")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"frechet_distance_to_activations: covariance of shape {sigma1.shape}; expected "
                         f"({mu1.shape[0]}, {mu1.shape[0]}) to match the mean")
    n, d = acts.shape
    if n - 1 >= d:
        return frechet_distance(mu1, sigma1, *gaussian_statistics(acts), method="eigh")
    mu2 = acts.mean(axis=0)                                          # (D,)
    centred = acts - mu2                                             # (N, D)
    gram = centred @ sigma1 @ centred.T / (n - 1)                    # (N, N) symmetric PSD
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((gram + gram.T) / 2), 0, None)).sum())
    tr_sigma2 = float((centred * centred).sum() / (n - 1))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + tr_sigma2 - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------

def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` consecutive rows, averaged over splits.

    `logits` (N, 1008) are pool_3 times the classifier weight without its bias, as in ADM. The last
    split may be shorter, exactly as ADM slices. log p comes from log_softmax in float64, which equals
    ADM's log(softmax) wherever the latter is finite.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score: got logits of shape {tuple(logits.shape)}; expected (N, classes), N > 0")
    scores = []
    for start in range(0, logits.shape[0], split_size):
        log_p = torch.log_softmax(logits[start:start + split_size], dim=1)  # (n, K) log p(y|x)
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(log_p.shape[0])  # (K,) log mean_x p(y|x)
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()  # E_x KL(p(y|x) || p(y))
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------
# Precision / Recall (k-NN manifolds)
# --------------------------------------------------------------------------------------------

def _squared_distances(u, v):
    """(n, D), (m, D) -> (n, m) squared distances as max(|u|^2 - 2 u.v + |v|^2, 0) in fp32.

    fp16 first, as ADM's DistanceBlock, which quantises the features; the whole block is recomputed
    in fp32 when any fp16 value is not finite (features too large for fp16).
    """
    for dtype in (torch.float16, torch.float32):
        a, b = u.to(dtype), v.to(dtype)
        norm_a = (a * a).sum(dim=1, keepdim=True)  # (n, 1)
        norm_b = (b * b).sum(dim=1, keepdim=True).T  # (1, m)
        dist = torch.clamp(norm_a - 2 * (a @ b.T) + norm_b, min=0)  # (n, m)
        if dtype == torch.float32 or bool(torch.isfinite(dist).all()):
            return dist.float()
    raise AssertionError("unreachable: the fp32 pass always returns")


def manifold_radii(features, k=PR_NEIGHBOURS, row_batch_size=PR_BATCH_SIZE, col_batch_size=PR_BATCH_SIZE):
    """(N, D) -> (N,) squared distance from each point to its k-th nearest neighbour (itself is the 0-th)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"manifold_radii: {n} feature vectors; expected more than k={k} to find k neighbours")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, row_batch_size):
        rows = features[r0:r0 + row_batch_size]  # (r, D)
        dist = torch.cat([_squared_distances(rows, features[c0:c0 + col_batch_size])
                          for c0 in range(0, n, col_batch_size)], dim=1)  # (r, N)
        radii[r0:r0 + rows.shape[0]] = torch.kthvalue(dist, k + 1, dim=1).values  # (r,)
    return radii


def precision_recall(ref_features, sample_features, k=PR_NEIGHBOURS, row_batch_size=PR_BATCH_SIZE,
                     col_batch_size=PR_BATCH_SIZE, device="cpu"):
    """ADM's improved precision and recall on pool_3 features.

    precision = share of samples within the k-NN ball (distance <= radius) of at least one reference point;
    recall = share of reference points within the k-NN ball of at least one sample.
    """
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)  # (N_r, D)
    sample = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)  # (N_s, D)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(f"precision_recall: features of shapes {tuple(ref.shape)} and {tuple(sample.shape)}; "
                         "expected (N_ref, D) and (N_sample, D) with the same D")
    ref_radii = manifold_radii(ref, k, row_batch_size, col_batch_size)  # (N_r,)
    sample_radii = manifold_radii(sample, k, row_batch_size, col_batch_size)  # (N_s,)
    ref_covered = torch.zeros(ref.shape[0], dtype=torch.bool, device=device)  # (N_r,) inside a sample ball
    sample_covered = torch.zeros(sample.shape[0], dtype=torch.bool, device=device)  # (N_s,) inside a ref ball
    for r0 in range(0, ref.shape[0], row_batch_size):
        r1 = r0 + row_batch_size
        for s0 in range(0, sample.shape[0], col_batch_size):
            s1 = s0 + col_batch_size
            dist = _squared_distances(ref[r0:r1], sample[s0:s1])  # (r, s)
            ref_covered[r0:r1] |= (dist <= sample_radii[None, s0:s1]).any(dim=1)  # (r,)
            sample_covered[s0:s1] |= (dist <= ref_radii[r0:r1, None]).any(dim=0)  # (s,)
    return float(sample_covered.double().mean()), float(ref_covered.double().mean())
