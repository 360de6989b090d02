"""tools/train_autoencoder.py: a killed run resumes to the same weights, and the training time of every invocation
is kept with its state."""
from types import SimpleNamespace

import numpy as np
import torch

from tools import train_autoencoder


def _args(out, steps):
    return SimpleNamespace(out=str(out), steps=steps, batch=2, lr=1e-3, kl_weight=1e-4, ckpt_every=1, seed=0)


def test_resumed_autoencoder_equals_an_uninterrupted_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, idx = torch.rand(8, 3, 64, 64, generator=g) * 2 - 1, np.arange(8)
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    whole, _ = train_autoencoder.train(_args(tmp_path / "whole", 3), images, idx)
    train_autoencoder.train(_args(tmp_path / "split", 2), images, idx)  # stops at step 2, as a kill would
    first = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)["seconds"]
    split, seconds = train_autoencoder.train(_args(tmp_path / "split", 3), images, idx)
    a, b = whole.state_dict(), split.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert seconds > first > 0  # the first invocation's time is carried into the second's
    assert torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)["step"] == 3
