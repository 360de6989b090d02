"""DiT backbone (Peebles & Xie, 2023) with the public checkpoints' state-dict layout.

Module and parameter names match facebookresearch/DiT exactly (`x_embedder.proj`, `t_embedder.mlp.0`,
`y_embedder.embedding_table`, `blocks.i.attn.qkv`, `blocks.i.adaLN_modulation.1`, `final_layer.linear`,
`pos_embed`, ...), so `DiT-XL-2-256x256.pt` loads with `strict=True`. The same DiTBlock is DC-DiT's
inner network; it also runs on packed or padded token sets (models/attention.py).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, TokenLayout
from .pos_embed import sincos_2d_grid


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; shift/scale are already broadcastable against x."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t -> Linear(SiLU(Linear(sinusoid_256(t)))), DiT's timestep embedding."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) possibly fractional timesteps -> (B, dim) as cat[cos(t w), sin(t w)] (DiT's order)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                                   # (B, dim/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)               # (B, dim)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance.

    The table has num_classes + 1 rows when dropout is on: row `num_classes` is the null class.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)                                      # (B, D)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H*W/p^2, D) by a stride-p conv; parameter names as timm's (`proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                           # (B, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, timm's names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    x is (B, N, D) for a dense or padded layout, or (T, D) for a packed one; c is always (B, D):
    modulation is computed once per sample and broadcast to its tokens, never once per token.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cond_size: Optional[int] = None,
                 has_mlp: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # has_mlp=False: attention only (the release's "d" block); its adaLN keeps all six chunks, as the release.
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio)) if has_mlp else None
        # cond_size: c's width when the block runs narrower than the model (a scaffold block at width E).
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)                                           # (B, 6D)
        mod = layout.per_token(mod) if layout is not None else mod.unsqueeze(1)  # (T, 6D) or (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), layout)
        if self.mlp is not None:
            x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + Linear to p*p*out_channels per token.

    cond_size defaults to hidden_size (DiT); DC-DiT's decoder runs at D/4 but is conditioned on c (D).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cond_size: Optional[int] = None):
        super().__init__()
        cond_size = cond_size or hidden_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)    # 2 x (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))           # (B, T, p*p*C)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, layout: Optional[TokenLayout],
               grad_checkpointing: bool) -> torch.Tensor:
    """Apply DiT blocks in order, with optional activation checkpointing while training."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, c, layout, use_reentrant=False)
        else:
            x = block(x, c, layout)
    return x


def init_linears(model: nn.Module, exclude=()) -> None:
    """Every Linear: xavier-uniform weight, zero bias (DiT's transformer default). Modules inside `exclude` (a
    module or a list of them) are left alone: they own their initialisation (DC-DiT's routers)."""
    excluded = [exclude] if isinstance(exclude, nn.Module) else list(exclude)
    skip = {m for module in excluded for m in module.modules()}
    for m in model.modules():
        if isinstance(m, nn.Linear) and m not in skip:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_conditioning(model: nn.Module) -> None:
    """DiT's init of the parts DiT and DC-DiT share: embedders N(0, 0.02); adaLN-Zero, so every block starts
    as the identity; a zero output layer."""
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def guided_eps(out: torch.Tensor, cfg_scale: float, guide_channels: int, in_channels: int) -> torch.Tensor:
    """Classifier-free guidance on a [cond; uncond] batch output, DiT's convention.

    Guides the first `guide_channels` channels (3 in DiT's exact-reproduction choice; 0 = all
    in_channels eps channels) and passes the rest (other eps channels, learned variance) through.
    """
    half = out.shape[0] // 2
    n = guide_channels if guide_channels > 0 else in_channels
    eps, rest = out[:, :n], out[:, n:]
    cond, uncond = eps[:half], eps[half:]
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


class DiT(nn.Module):
    """Diffusion Transformer: patchify -> DiT blocks (adaLN-Zero) -> final layer -> unpatchify."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, grad_checkpointing: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = input_size
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # A frozen Parameter, not a buffer: the public checkpoints store it under `pos_embed`.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears(self)
        # Fixed 2D sin-cos positions on the patch grid.
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_2d_grid(self.pos_embed.shape[-1], grid).unsqueeze(0))
        # Patch embedding like a Linear: xavier on the flattened kernel.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        init_conditioning(self)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)                                 # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)                                    # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)                            # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,), y (B,) -> (B, out_channels, H, W)."""
        h = self.x_embedder(x) + self.pos_embed                                  # (B, T, D), T = H*W/p^2
        c = self.t_embedder(t) + self.y_embedder(y, self.training)               # (B, D)
        h = run_blocks(self.blocks, h, c, None, self.grad_checkpointing)        # (B, T, D)
        h = self.final_layer(h, c)                                               # (B, T, p*p*out)
        return self.unpatchify(h)                                                # (B, out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int = 3) -> torch.Tensor:
        """x is [cond half; uncond half] with y holding the null class in the second half."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)                 # (2B', out, H, W)
        return guided_eps(out, cfg_scale, guide_channels, self.in_channels)


# Sizes of the DiT paper (depth, hidden, heads); patch sizes 1, 2, 4, 8.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _dit_factory(size: str, patch: int):
    depth, hidden, heads = DIT_SIZES[size]

    def make(**kwargs) -> DiT:
        kwargs.setdefault("depth", depth)
        kwargs.setdefault("hidden_size", hidden)
        kwargs.setdefault("num_heads", heads)
        return DiT(patch_size=patch, **kwargs)

    make.__name__ = f"DiT_{size}_{patch}"
    return make


DiT_models = {f"DiT-{size}/{patch}": _dit_factory(size, patch) for size in DIT_SIZES for patch in (1, 2, 4, 8)}
