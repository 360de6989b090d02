"""Timestep respacing: sample (or train) with a subset of the original diffusion steps.

Same rules as DiT's ``diffusion/respace.py`` (from ADM): keeping timesteps S = {s_0 < s_1 < ...}
defines a shorter Markov chain with betas 1 - abar_{s_k} / abar_{s_{k-1}}, which has exactly the
original abar at every kept step, so a network trained on the full chain is reused unchanged.
The network still sees original timesteps: the respaced index k is mapped to s_k before the call
(DiT passes rescale_timesteps=False, so there is no rescaling to a 0..1000 range).
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """Set of original timesteps to keep.

    section_counts: a list of ints or a comma-separated string ("10,15,20"): the T steps are cut into
    len(section_counts) near-equal sections (the first T % n one step longer) and section i keeps
    section_counts[i] steps evenly spread over it, start and end included, rounded to integers. So
    "250" over 1000 steps keeps round(k * 999 / 249) for k = 0..249. The string "ddimN" instead keeps
    range(0, T, stride) for the smallest integer stride that gives exactly N steps (DDIM's striding).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing {section_counts!r}: no integer stride gives exactly {desired} "
                f"of {num_timesteps} steps"
            )
        section_counts = [int(part) for part in section_counts.split(",")]
    if len(section_counts) == 0:
        raise ValueError("timestep_respacing: expected at least one section count")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"timestep_respacing: cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # The position is accumulated in floating point (not k * stride), as ADM does, so the rounded
        # steps are identical to the reference even where the two would differ in the last bit.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept timesteps `use_timesteps` of a base process.

    kwargs are those of GaussianDiffusion for the *base* process (its full betas). Attributes:
    timestep_map[k] = the original timestep of respaced index k; original_num_steps = len(betas).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        if not self.use_timesteps or not all(0 <= s < self.original_num_steps for s in self.use_timesteps):
            raise ValueError(
                f"use_timesteps: expected a non-empty subset of range({self.original_num_steps}), "
                f"got {sorted(self.use_timesteps)[:8]}..."
            )
        base = GaussianDiffusion(**kwargs)
        self.timestep_map = sorted(self.use_timesteps)
        kept_abar = base.alphas_cumprod[self.timestep_map]  # (S,)
        prev_abar = np.append(1.0, kept_abar[:-1])  # (S,)
        kwargs["betas"] = 1.0 - kept_abar / prev_abar
        super().__init__(**kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _TimestepMappedModel):
            return model
        return _TimestepMappedModel(model, self.timestep_map)


class _TimestepMappedModel:
    """Calls model(x, timestep_map[t], **kwargs): the network always sees original timesteps."""

    def __init__(self, model, timestep_map):
        self.model = model
        self.timestep_map = torch.tensor(timestep_map)  # (S,)

    def __call__(self, x, ts, **kwargs):
        original_ts = self.timestep_map.to(device=ts.device, dtype=ts.dtype)[ts]  # (B,)
        return self.model(x, original_ts, **kwargs)
