"""Behaviour pinned to stored numbers: a refactor that moves code must not change what the models compute.

tests/data/pinned.pt holds, for tiny DiT and DC-DiT variants (every router, packed and padded attention,
DyDiT), the state-dict key list, a checksum of every freshly initialised tensor (seed 0: catches a changed
initialisation or construction order), and the outputs, kept masks and parameter-gradient checksums of a
forward/backward on fixed inputs with weights drawn from each parameter's name (independent of the init).
Regenerate only for an intended change of behaviour: `python tests/test_pinned.py` (and say why in the commit).
"""
import os
import zlib

import pytest
import torch

from config import load_config
from models import create_model

PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pinned.pt")
TINY = "configs/tiny/test-dcdit.yaml"
VARIANTS = {
    "dit": (["model.name=DiT-S/2"], False),
    "cosine_packed": ([], False),
    "predictability_padded": (["model.router=predictability", "model.attention=padded"], False),
    "predictability_target_zero_residual": (["model.router=predictability", "model.router_args={bias_init: target}",
                                             "model.residual_init=zero", "model.inner_norm=false"], False),
    "random": (["model.router=random"], False),
    "dydit": (["dydit.enabled=true"], True),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(overrides):
    cfg = load_config(os.path.join(ROOT, TINY), overrides)
    torch.manual_seed(0)
    return create_model(cfg.model, cfg.dydit), cfg


def name_seeded_weights(model):
    """Every parameter and buffer drawn from a generator seeded by its name: trained-looking, and the same
    whatever order the model creates its modules in."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype.is_floating_point and "pos_table" not in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def inputs():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(3, 4, 8, 8, generator=g)
    return x, torch.tensor([0, 321, 999]), torch.tensor([1, 7, 10])


def record(name):
    overrides, dydit = VARIANTS[name]
    model, cfg = build(overrides)
    out = {"keys": list(model.state_dict().keys()),
           "init": {k: (float(v.double().sum()), float(v.double().abs().sum())) for k, v in model.state_dict().items()}}
    model = name_seeded_weights(model)
    x, t, y = inputs()
    dc = cfg.model.name.startswith("DCDiT")
    for f_name, f in (("f0", 0.0), ("f3", 0.3), ("per_sample", torch.tensor([0.0, 0.5, 0.2]))):
        if not dc and f_name != "f0":
            continue
        model.train()  # masked DyDiT execution and straight-through gates, as in training
        model.zero_grad()
        torch.manual_seed(7)  # the random router and label dropout draw from the global generator
        kw = dict(return_info=True, tail_drop=f) if dc else {}
        res = model(x, t, y, **kw)
        o, info = res if dc else (res, None)
        (o.square().mean() + (info.router.prob.mean() if dc else 0.0)).backward()
        grads = {k: float(p.grad.double().abs().sum()) for k, p in model.named_parameters() if p.grad is not None}
        entry = {"out": o.detach().clone(), "grads": grads}
        if dc:
            entry["mask"] = info.router.mask.clone()
            entry["prob"] = info.router.prob.detach().clone()
        model.eval()
        torch.manual_seed(7)
        with torch.no_grad():
            res = model(x, t, y, **kw)
        entry["eval_out"] = (res[0] if dc else res).clone()
        out[f_name] = entry
    return out


@pytest.fixture(scope="module")
def pinned():
    return torch.load(PINNED, weights_only=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_models_compute_what_they_computed(pinned, name):
    want, got = pinned[name], record(name)
    assert got["keys"] == want["keys"]  # state-dict layout (checkpoints)
    for k, (s, a) in want["init"].items():  # initialisation and construction order
        assert got["init"][k] == pytest.approx((s, a), rel=1e-6, abs=1e-6), k
    for f_name in ("f0", "f3", "per_sample"):
        if f_name not in want:
            continue
        w, g = want[f_name], got[f_name]
        # Bit-identical on the machine that stored them; 1e-6 leaves room for another CPU's BLAS.
        torch.testing.assert_close(g["out"], w["out"], rtol=0, atol=1e-6)
        torch.testing.assert_close(g["eval_out"], w["eval_out"], rtol=0, atol=1e-6)
        if "mask" in w:
            assert torch.equal(g["mask"], w["mask"]) and torch.allclose(g["prob"], w["prob"], rtol=0, atol=1e-6)
        assert g["grads"].keys() == w["grads"].keys()
        for k, v in w["grads"].items():
            assert g["grads"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (f_name, k)


if __name__ == "__main__":
    os.makedirs(os.path.dirname(PINNED), exist_ok=True)
    torch.save({name: record(name) for name in VARIANTS}, PINNED)
    print(f"wrote {PINNED}")
