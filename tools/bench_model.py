"""Training-step cost of DC-DiT against DiT at the same inner token count, and the chunking overhead.

One training step = forward + backward of the diffusion loss (+ the ratio loss for DC-DiT, weight
0.03, paper §3.5), no optimizer step. DiT-X/2 on a 32x32 latent runs 256 tokens through its blocks;
DC-DiT-X (same width, depth, heads) is forced to keep exactly 256 tokens per sample
(tools.flops.FixedCountRouter: its own router still runs, then the top-256 tokens by p are kept), so
the two differ only by the scaffold: conv encoder/decoder on all L tokens, router, chunk, dechunk,
residual path. The share of the step spent in router + chunk + dechunk (the target: under
10% for the B config on CPU at batch 8) is measured by timing each of them, forward and backward,
on the very tensors the step fed them. Models are freshly initialised: timing does not depend on
the weights once M is fixed.

Repeats are interleaved (DiT step, DC-DiT step, pieces, then again) so machine load hits all alike;
the medians are printed side by side, last, as one table. CUDA runs under bf16 autocast.

    python tools/bench_model.py                          # B, batch 8, 3 repeats
    python tools/bench_model.py --config-size B --batch 2
    python tools/bench_model.py --tiny                   # seconds, for a quick check
"""
import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from diffusion import create_diffusion
from models.chunking import chunk, dechunk
from models.dc_dit import DCDiT_models
from models.dit import DIT_SIZES, DiT_models
from models.routing import ratio_loss
from models.routing import keep_exactly as forced_kept

RATIO_LOSS_WEIGHT = 0.03  # paper §3.5 / config.TrainConfig.ratio_loss_weight
# --tiny: a 16x16 grid, width 64, 2 blocks (seconds on a laptop CPU), patch 2 -> 64 tokens.
TINY = dict(input_size=16, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def build_models(size: str, tiny: bool, device):
    """DiT-size/2 and DCDiT-size with the same inner blocks; DC-DiT's default router (cosine, §3.3)."""
    if tiny:
        dit = DiT_models["DiT-S/2"](**TINY)
        dc = DCDiT_models["DCDiT-S"](**TINY, encoder_width=16, norm_groups=4)
    else:
        dit = DiT_models[f"DiT-{size}/2"](input_size=32)
        dc = DCDiT_models[f"DCDiT-{size}"](input_size=32)
    return dit.to(device).train(), dc.to(device).train()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class Bench:
    def __init__(self, args, device):
        self.device = device
        self.dit, self.dc = build_models(args.config_size, args.tiny, device)
        self.size = "tiny" if args.tiny else args.config_size
        grid = self.dc.input_size
        self.kept = (grid // 2) ** 2  # DiT-X/2's token count
        self.diffusion = create_diffusion("")
        g = torch.Generator().manual_seed(0)
        B = args.batch
        self.x = torch.randn(B, 4, grid, grid, generator=g).to(device)                     # (B, 4, H, W)
        self.y = torch.randint(0, self.dc.y_embedder.num_classes, (B,), generator=g).to(device)  # (B,)
        self.t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g).to(device)  # (B,)
        self.noise = torch.randn(self.x.shape, generator=g).to(device)                    # (B, 4, H, W)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
        self.pieces = None

    # -- whole training steps -----------------------------------------------------------------------
    def dit_step(self) -> None:
        self.dit.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.diffusion.training_losses(self.dit, self.x, self.t, dict(y=self.y), noise=self.noise)
            loss = loss["loss"].mean()
        loss.backward()

    def dc_step(self) -> None:
        self.dc.zero_grad(set_to_none=True)
        infos = []

        def model_fn(x_t, ts, **kw):
            out, info = self.dc(x_t, ts, return_info=True, **kw)
            infos.append(info)
            return out

        with forced_kept(self.dc, self.kept), self.autocast:
            loss = self.diffusion.training_losses(model_fn, self.x, self.t, dict(y=self.y), noise=self.noise)
            r = infos[0].router
            loss = loss["loss"].mean() + RATIO_LOSS_WEIGHT * ratio_loss(r.natural_mask, r.prob,
                                                                        self.dc.downsample_factor)
        loss.backward()

    # -- router, chunk, dechunk alone, on the tensors a step gives them ---------------------------
    def capture_piece_inputs(self) -> None:
        """Rebuild the step's inputs to router, chunk and dechunk (same x_t, t, y, same forced M)."""
        dc = self.dc
        with torch.no_grad(), forced_kept(dc, self.kept), self.autocast:
            x_t = self.diffusion.q_sample(self.x, self.t, noise=self.noise)               # (B, 4, H, W)
            c = dc.t_embedder(self.t) + dc.y_embedder(self.y, dc.training)                       # (B, D)
            enc = dc.encoder(x_t, c)                                                      # (B, L, D)
            r = dc.router(enc, dc.grid)                                                   # RouterOutput (B, L)
            z, valid, idx = chunk(enc, r.mask, r.prob)                                    # (B, M, D), (B, M) x2
        self.pieces = dict(enc=enc, mask=r.mask, prob=r.prob, z=z, valid=valid, idx=idx)

    def router_piece(self) -> None:
        """The model's own router (not the forced top-M override), with the gradient paths it has in a
        step: p reaches the loss through dechunk and the ratio loss, `selected` through the STE gate."""
        enc = self.pieces["enc"].detach().requires_grad_(True)
        with self.autocast:
            r = self.dc.router(enc, self.dc.grid)
            (r.prob.sum() + r.selected.sum()).backward()

    def chunk_piece(self) -> None:
        enc = self.pieces["enc"].detach().requires_grad_(True)
        with self.autocast:
            z, _, _ = chunk(enc, self.pieces["mask"], self.pieces["prob"])
            z.sum().backward()

    def dechunk_piece(self) -> None:
        p = self.pieces
        z = p["z"].detach().requires_grad_(True)
        prob = p["prob"].detach().requires_grad_(True)
        with self.autocast:
            u = dechunk(z, prob, p["idx"], p["valid"], self.dc.grid, self.dc.dechunk_sigma)
            u.sum().backward()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-size", default="B", choices=list(DIT_SIZES),
                        help="inner DiT size: DiT-<size>/2 against DCDiT-<size>")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernel choice)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (64 tokens) for a quick check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error(f"--batch and --repeats must be >= 1 and --warmup >= 0, got {args.batch}, {args.repeats}, "
                     f"{args.warmup}")
    device = torch.device(args.device)
    bench = Bench(args, device)
    bench.capture_piece_inputs()
    L = bench.dc.grid[0] * bench.dc.grid[1]
    print(f"size {bench.size}, batch {args.batch}, device {device}"
          f"{' (bf16 autocast)' if device.type == 'cuda' else ''}, torch threads {torch.get_num_threads()}; "
          f"DiT {bench.kept} tokens, DC-DiT L={L} -> exactly M={bench.kept} kept", flush=True)

    jobs = {"DiT step": bench.dit_step, "DC-DiT step": bench.dc_step, "router": bench.router_piece,
            "chunk": bench.chunk_piece, "dechunk": bench.dechunk_piece}
    for _ in range(args.warmup):
        for fn in jobs.values():
            fn()
    times = {name: [] for name in jobs}
    for i in range(args.repeats):
        for name, fn in jobs.items():
            times[name].append(timed(fn, device))
        print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
              flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["router"] + med["chunk"] + med["dechunk"]
    print("\nmedians (forward + backward, seconds)")
    print(f"{'measure':42s} {'value':>10s}")
    rows = [("DiT step (s)", f"{med['DiT step']:.4f}"),
            ("DC-DiT step (s)", f"{med['DC-DiT step']:.4f}"),
            ("DC-DiT / DiT step time", f"{med['DC-DiT step'] / med['DiT step']:.3f}"),
            ("router (s)", f"{med['router']:.4f}"),
            ("chunk (s)", f"{med['chunk']:.4f}"),
            ("dechunk (s)", f"{med['dechunk']:.4f}"),
            ("router+chunk+dechunk share of DC-DiT step", f"{100 * overhead / med['DC-DiT step']:.1f}%"),
            ("  target (B on CPU at batch 8)", "< 10%")]
    for name, value in rows:
        print(f"{name:42s} {value:>10s}")


if __name__ == "__main__":
    main()
