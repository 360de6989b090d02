"""Convert a checkpoint trained with the authors' release (AMD-AGI/DynamicChunkingDiT) into this project's format.

    python tools/convert_release_checkpoint.py RELEASE.pt OUT.pt
    python sample.py --ckpt OUT.pt                      # then sample, score or fine-tune as any checkpoint here

The release's file is read without executing pickled code (its config dataclasses become plain records;
any other class is refused), its config becomes this project's (predictability router, inner-stack
RMSNorm, the release's multi-budget settings), every weight is renamed and loaded strictly into a DCDiT,
and OUT.pt = {"model", "ema", "config", "step": 0} is written atomically. See docs/release_checkpoints.md.
"""
import argparse
import os

from config import main_guard
from fileio import atomic_save
from models.release import convert_release_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release", help="checkpoint written by the release's train.py ({model, ema, opt, config})")
    parser.add_argument("out", help="where to write this project's checkpoint")
    args = parser.parse_args(argv)
    ckpt, cfg, notes = convert_release_checkpoint(args.release)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save(ckpt, args.out)
    m = cfg.model
    params = sum(v.numel() for v in ckpt["model"].values()) / 1e6
    print(f"{args.release} -> {args.out}: {m.name} (depth {m.depth}, width {m.hidden_size}, {m.num_heads} heads, "
          f"N = {m.downsample_factor:g}, {m.input_size}x{m.input_size} latents, predictability router), "
          f"{params:.2f}M parameters in model and EMA")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main_guard(main)()
