"""Inception activations of an image source, cached in an .npz next to the input.

The cache is keyed by the SHA-256 of the weights file and the input's size and mtime (every PNG's, for
a folder), so a second metric run on the same files, e.g. the reference batch against several sample
sets, skips the network. ADM's evaluator keeps nothing between runs; the numbers are the same.
"""
import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from fileio import atomic_write

CACHE_VERSION = 1  # bump when what is stored changes


@dataclass
class Activations:
    pool: np.ndarray  # (N, 2048) pool_3: FID, Precision/Recall
    spatial: np.ndarray  # (N, 2023) mixed_6/conv[..., :7] in (H, W, C) order: sFID
    logits: Optional[np.ndarray]  # (N, 1008) pool_3 @ W without bias: IS; None if the weights lack it


def cache_path(source, net):
    """`<input>.inception-<weights sha[:12]>.npz` beside the input, or None for in-memory inputs."""
    path = getattr(source, "path", None)
    if path is None or source.fingerprint() is None:
        return None
    return f"{os.path.normpath(path)}.inception-{net.weights_sha256[:12]}.npz"


def _cache_key(source, net):
    text = f"v{CACHE_VERSION}|{net.weights_sha256}|{source.fingerprint()}"
    return hashlib.sha256(text.encode()).hexdigest()


def _load_cache(path, key, count):
    try:
        with np.load(path) as cached:
            if str(cached["key"]) != key or cached["pool"].shape[0] != count:
                return None  # the input or the weights changed since: recompute
            logits = cached["logits"] if "logits" in cached.files else None
            return Activations(cached["pool"], cached["spatial"], logits)
    except (OSError, KeyError, ValueError):
        return None  # unreadable or foreign file: recompute and overwrite


def _save_cache(path, key, acts):
    arrays = {"key": np.array(key), "pool": acts.pool, "spatial": acts.spatial}
    if acts.logits is not None:
        arrays["logits"] = acts.logits
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))  # a killed run never leaves half a cache
    except OSError as e:  # a read-only input folder only costs the speed-up
        print(f"warning: activation cache {path} not written ({e})", file=sys.stderr)


def compute_activations(net, source, batch_size=64, device="cpu", use_cache=True, desc="activations"):
    """Run `net` over every image of `source` in order; read or write the activation cache."""
    path = cache_path(source, net) if use_cache else None
    key = _cache_key(source, net) if path is not None else None
    if path is not None and os.path.isfile(path):
        cached = _load_cache(path, key, len(source))
        if cached is not None:
            print(f"{desc}: {len(source)} activations read from {path}", file=sys.stderr)
            return cached
    pools, spatials, logits = [], [], []
    total = (len(source) + batch_size - 1) // batch_size
    with torch.no_grad():
        for batch in tqdm(source.batches(batch_size), total=total, desc=desc, unit="batch"):
            batch = np.require(batch, requirements="CW")  # streamed .npz batches are read-only: copy those
            images = torch.from_numpy(batch).to(device)  # (B, H, W, 3) uint8
            pool, spatial, logit = net(images)  # (B, 2048), (B, 2023), (B, 1008) or None
            pools.append(pool.float().cpu().numpy())
            spatials.append(spatial.float().cpu().numpy())
            if logit is not None:
                logits.append(logit.float().cpu().numpy())
    acts = Activations(np.concatenate(pools), np.concatenate(spatials),
                       np.concatenate(logits) if logits else None)
    if path is not None:
        _save_cache(path, key, acts)
    return acts
