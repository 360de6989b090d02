"""A digit classifier for the digits reports: is a class-conditional sample recognisably its class?

FID at this scale ranks models but says little about whether a model is competent. A small CNN trained on the
bundled digits answers that directly: the share of samples of class c that it classifies as c. It is trained
once (a minute on a CPU), deterministically, on every 10th digit held out, and cached as a state dict.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SIZE = 32          # images are resized to 32 x 32 grey before classification, whatever size they come at
HELD_OUT_EVERY = 10


class DigitNet(nn.Module):
    """Three conv layers and a linear head on 32 x 32 grey digits in [-1, 1]."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),     # 16 x 16
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),    # 8 x 8
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2))  # 4 x 4
        self.head = nn.Linear(128 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x).flatten(1))                           # (B, classes) logits


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) or (N, H, W) uint8 -> (N, 1, 32, 32) grey in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() == 4:
        x = x.mean(-1)                                                       # (N, H, W)
    x = x[:, None] / 127.5 - 1.0                                             # (N, 1, H, W)
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def train_classifier(epochs: int = 6, seed: int = 0) -> tuple:
    """-> (DigitNet in eval mode, held-out accuracy). Deterministic for a seed."""
    from data import DigitsDataset, to_uint8_images
    ds = DigitsDataset()
    x = to_input(to_uint8_images(ds.images))                                 # (5000, 1, 32, 32)
    y = ds.labels
    held = torch.arange(len(y)) % HELD_OUT_EVERY == 0
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    train_idx = torch.nonzero(~held).squeeze(1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(train_idx) + 63) // 64))
    net.train()
    for _ in range(epochs):
        for batch in train_idx[torch.randperm(len(train_idx), generator=g)].split(64):
            loss = F.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x[held]).argmax(1) == y[held]).float().mean())
    return net, accuracy


def load_classifier(cache: str, epochs: int = 6) -> tuple:
    """The classifier of `cache` (a state dict + its held-out accuracy), trained for `epochs` and cached when
    missing or trained for another number of epochs."""
    if os.path.isfile(cache):
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if int(saved.get("epochs", 6)) == epochs:
            net = DigitNet()
            net.load_state_dict(saved["model"])
            return net.eval(), float(saved["accuracy"])
    net, accuracy = train_classifier(epochs=epochs)
    from fileio import atomic_save
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    atomic_save({"model": net.state_dict(), "accuracy": accuracy, "epochs": epochs}, cache)
    return net, accuracy


@torch.no_grad()
def recognised(net: DigitNet, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    """Share of images the classifier assigns to their conditioning label."""
    x = to_input(images)
    pred = torch.cat([net(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == torch.as_tensor(np.asarray(labels))).float().mean())
