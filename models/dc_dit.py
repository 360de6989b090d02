"""DC-DiT: the Dynamic Chunking Diffusion Transformer (paper §3).

condition -> encode -> route -> chunk -> process (DiT blocks on the kept tokens) -> dechunk -> decode:
one method per stage, and `forward` runs them in that order.
The inner blocks, t_embedder and y_embedder are DiT's modules under DiT's names, so a public DiT
checkpoint's `blocks.*` load straight into `blocks.*` here (upcycling, §4.4).
"""
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import TokenLayout
from .chunking import build_dechunker, grid_coords
from .chunking import chunk as chunk_tokens
from .dit import (DIT_SIZES, DiTBlock, FinalLayer, LabelEmbedder, TimestepEmbedder, guided_eps, init_conditioning,
                  init_linears)
from .dydit import DyDiTBlock, DyDiTInfo, GateTally
from .hierarchy import InnerStage, StageInfo
from .isotropic import RMS_EPS, Decoder, Encoder
from .pos_embed import sincos_2d
from .routers import build_router
from .routing import RouterOutput
from .routing import tail_drop as drop_lowest_boundaries

Fraction = Union[float, torch.Tensor]

# Initialisation of residual_proj's weight: xavier (what the authors' release trains) | zero (H-Net).
RESIDUAL_INITS = ("xavier", "zero")


class _GateSTE(torch.autograd.Function):
    """u * STE(selected) (§3.1, H-Net) without the multiply: the gate is 1 in the forward pass, so the
    output is u itself; backward passes u's gradient through unchanged and gives `selected` the gradient
    of u * selected, the per-token dot product <grad, u>."""

    @staticmethod
    def forward(ctx, u, selected):
        ctx.save_for_backward(u)
        ctx.selected_dtype = selected.dtype
        return u.view_as(u)  # (B, L, D)

    @staticmethod
    def backward(ctx, grad):
        u, = ctx.saved_tensors
        return grad, torch.linalg.vecdot(grad, u).to(ctx.selected_dtype)  # (B, L, D), (B, L)


def ste_gate(u: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """u (B, L, D) times the straight-through gate of selected (B, L): value u, gradient to selected."""
    return _GateSTE.apply(u, selected)


@dataclass
class ChunkInfo:
    """Per-sample routing statistics of one forward (returned with return_info=True, never cached)."""
    router: RouterOutput   # prob (B, L), mask (B, L) kept after tail dropping, natural_mask (B, L), selected (B, L)
    kept: torch.Tensor     # (B,) long, tokens the inner blocks ran for each sample (M_b after tail dropping)
    grid: tuple            # (H, W) token grid
    # Only with collect_blocks=True (activation distillation when upcycling, §4.4; models/upcycle.py):
    blocks: Optional[list] = None       # depth x (B, Mmax, D), each inner block's output, unpacked
    idx: Optional[torch.Tensor] = None  # (B, Mmax) long raster position of each slot
    valid: Optional[torch.Tensor] = None  # (B, Mmax) bool, real kept tokens (False at padding slots)
    # Only for a model built with dydit=True (§4.5, models/dydit.py): gates and FLOPs of the inner blocks.
    dydit: Optional[DyDiTInfo] = None
    # Only for a two-stage model (models/hierarchy.py): the inner stage's decisions; `kept` is then its M1, and
    # router.natural_mask.sum(1) stage 0's M0.
    stage1: Optional[StageInfo] = None


@dataclass
class Chunks:
    """The kept tokens of a batch as the inner blocks take them (`DCDiT.chunk`)."""
    tokens: torch.Tensor   # (T, D) packed, or (B, Mmax, D) padded; kept tokens plus their positions
    layout: TokenLayout    # how tokens are laid out (cu_seqlens, valid)
    idx: torch.Tensor      # (B, Mmax) long raster position of each slot (padding slots included)
    valid: torch.Tensor    # (B, Mmax) bool, real kept tokens


class DCDiT(nn.Module):
    def __init__(self, input_size: int = 32, in_channels: int = 4, hidden_size: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, encoder_width: Optional[int] = None,
                 norm_groups: int = 32, router: str = "cosine", router_args: Optional[dict] = None,
                 downsample_factor: float = 4.0, dechunker: str = "gaussian", dechunk_sigma: float = 1.0,
                 pos_scale: float = 1.0, cond_adaptor: bool = False, attention: str = "packed",
                 grad_checkpointing: bool = False, dydit: bool = False, dydit_tau: float = 5.0,
                 inner_norm: bool = True, residual_init: str = "xavier", encoder_layout: str = "c2",
                 decoder_layout: str = "c2", stage1_downsample_factor: Optional[float] = None,
                 stage1_encoder_depth: int = 1, stage1_decoder_depth: int = 1, stage1_dechunker: str = "gaussian",
                 stage1_dechunk_sigma: float = 2.0, stage1_router_sigma: float = 2.0):
        super().__init__()
        if attention not in ("packed", "padded"):
            raise ValueError(f"attention must be 'packed' or 'padded', got {attention!r}")
        if residual_init not in RESIDUAL_INITS:
            raise ValueError(f"residual_init must be one of {RESIDUAL_INITS}, got {residual_init!r}")
        self.residual_init = residual_init
        self.input_size = input_size
        self.grid = (input_size, input_size)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.downsample_factor = downsample_factor
        self.dechunk_sigma = dechunk_sigma
        self.pos_scale = pos_scale
        self.packed = attention == "packed"
        self.grad_checkpointing = grad_checkpointing
        self.dydit = dydit
        width = encoder_width or hidden_size // 4
        # sin-cos of every grid cell's (row, col) * pos_scale, (L, D); derived, so not in the state dict.
        cells = torch.arange(input_size * input_size)                           # (L,)
        table = sincos_2d(grid_coords(cells, self.grid) * pos_scale, hidden_size)  # (L, D)
        self.register_buffer("pos_table", table, persistent=False)

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.encoder = Encoder(in_channels, width, hidden_size, norm_groups, cond_adaptor, encoder_layout)
        self.router = build_router(router, hidden_size, downsample_factor, **(router_args or {}))
        if dydit:  # DyDiT gates on the inner blocks (§4.5); same parameter names plus the routers
            blocks = [DyDiTBlock(hidden_size, num_heads, mlp_ratio, tau=dydit_tau) for _ in range(depth)]
        else:
            blocks = [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        # The inner stack ends with an RMSNorm before de-chunking, as H-Net's isotropic stack and the authors'
        # release: it sets the scale of the de-chunked path against residual_proj(enc) in the sum of §3.1.
        self.inner_norm = nn.RMSNorm(hidden_size, eps=RMS_EPS) if inner_norm else None
        # A second chunking stage between stage 0's kept tokens and the inner blocks (models/hierarchy.py).
        self.stage1 = None if stage1_downsample_factor is None else InnerStage(
            hidden_size, num_heads, mlp_ratio, stage1_downsample_factor, stage1_encoder_depth, stage1_decoder_depth,
            stage1_dechunker, stage1_dechunk_sigma, stage1_router_sigma)
        self.dechunker = build_dechunker(dechunker, dechunk_sigma)
        self.residual_proj = nn.Linear(hidden_size, hidden_size)
        self.decoder = Decoder(width, hidden_size, norm_groups, cond_adaptor, decoder_layout)
        self.final_layer = FinalLayer(width, 1, self.out_channels, cond_size=hidden_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Every Linear as DiT (xavier, zero bias), the router excepted: it owns its initialisation. That includes
        # residual_proj: the authors' release flags it zero-initialised like H-Net, but its later DiT-style init
        # pass overwrites the zero with xavier, and that is the network behind the paper's numbers.
        routers = [self.router] + ([self.stage1.router] if self.stage1 is not None else [])
        init_linears(self, exclude=routers)
        for router in routers:
            router.reset_parameters()
        if self.residual_init == "zero":
            # H-Net's choice: the decoder first sees only the de-chunked features.
            nn.init.zeros_(self.residual_proj.weight)
            if self.stage1 is not None:
                nn.init.zeros_(self.stage1.residual_proj.weight)
        # The 3x3 patch-embed conv like a Linear (xavier on the flattened kernel, zero bias), as DiT's patch
        # embedding and the release; the other convs keep PyTorch's default (LDM), as the release.
        w = self.encoder.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.encoder.patch_embed.bias)
        # Embedders, adaLN-Zero inner blocks, zero output layer (DiT); DiT blocks of the scaffold start as the
        # identity too (adaLN-Zero).
        init_conditioning(self)
        for side in (self.encoder, self.decoder) + ((self.stage1,) if self.stage1 is not None else ()):
            for block in side.modules():
                if isinstance(block, DiTBlock):
                    nn.init.zeros_(block.adaLN_modulation[-1].weight)
                    nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # DyDiT routers (§4.5): biases high (15 width, 35 token, as the release) so every gate starts on.
        for block in self.blocks:
            if isinstance(block, DyDiTBlock):
                block.reset_gates()

    # ---- the stages of §3, in order (forward runs them; benchmarks, FLOP counting and distillation call them)

    def condition(self, t: torch.Tensor, y: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None):
        """Timestep and class -> (c, t_emb), each (B, D). DyDiT's width gates read t_emb alone."""
        t_emb = self.t_embedder(t)                                               # (B, D)
        return t_emb + self.y_embedder(y, self.training, force_drop_ids), t_emb  # (B, D), (B, D)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) -> encoder tokens (B, L, D) on the full grid (§3.2)."""
        if x.shape[-2:] != self.grid:
            raise ValueError(f"input grid {tuple(x.shape[-2:])} does not match the model's {self.grid}")
        return self.encoder(x, c)                                                # (B, L, D)

    def route(self, enc: torch.Tensor, tail_drop: Fraction = 0.0) -> RouterOutput:
        """Boundary probabilities and decisions (§3.3), then elastic tail dropping (f: float or (B,))."""
        r = self.router(enc, self.grid)                                          # RouterOutput, each (B, L)
        if torch.is_tensor(tail_drop) or tail_drop > 0:
            r.mask = drop_lowest_boundaries(r.prob, r.natural_mask, tail_drop)  # (B, L)
        return r

    def chunk(self, enc: torch.Tensor, r: RouterOutput) -> Chunks:
        """Kept tokens in raster order (§3.3), each plus the sin-cos of its own (row, col), laid out for the
        inner blocks: packed (T, D) with no padding anywhere, or padded (B, Mmax, D) with a key mask."""
        # The forward's one host sync: Mmax and the packed axis' size are shapes. Read here, in this frame, so
        # torch.compile breaks its graph once rather than once per nested call.
        counts = r.mask.sum(1).tolist()                                          # B ints M_b
        z, valid, idx = chunk_tokens(enc, r.mask, r.prob, counts=counts)         # (B, Mmax, D), (B, Mmax) x2
        z = z + self.pos_embed(idx).to(z.dtype)                                  # (B, Mmax, D)
        layout = TokenLayout.build(valid, self.packed, counts)                   # no further host sync
        return Chunks(layout.pack(z), layout, idx, valid)                        # (T, D) | (B, Mmax, D)

    def process(self, h: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor, layout: TokenLayout,
                collect: Optional[list] = None):
        """The inner DiT blocks on the kept tokens, then the inner stack's RMSNorm -> (h, DyDiTInfo | None).

        collect: a list that receives every block's output unpacked to (B, Mmax, D) (activation distillation).
        """
        tally = GateTally(layout, c) if self.dydit else None
        for block in self.blocks:
            args = (h, c, layout, t_emb) if tally is not None else (h, c, layout)
            if self.grad_checkpointing and torch.is_grad_enabled():
                res = checkpoint(block, *args, use_reentrant=False)
            else:
                res = block(*args)
            if tally is not None:
                h, head, group, token = res                                      # same shape; DyDiT's gates
                tally.add(block.dims, head, group, token)
            else:
                h = res                                                          # same shape
            if collect is not None:
                collect.append(layout.unpack(h))                                 # (B, Mmax, D)
        if self.inner_norm is not None:
            h = self.inner_norm(h)                                               # same shape
        return h, (tally.info() if tally is not None else None)

    def process_two_stage(self, chunks: Chunks, c: torch.Tensor, t_emb: torch.Tensor, tail_drop: Fraction = 0.0,
                          collect: Optional[list] = None):
        """A second chunking stage around the inner blocks (models/hierarchy.py) -> (h on the stage-0 tokens,
        DyDiTInfo | None, StageInfo). Tail dropping happens here, at the innermost stage."""
        s1, gc = self.stage1, self.grad_checkpointing
        enc = chunks.layout.unpack(s1.encode(chunks.tokens, c, chunks.layout, gc))  # (B, M0max, D)
        pos = grid_coords(chunks.idx, self.grid)                                     # (B, M0max, 2)
        r = s1.route(enc, pos, chunks.valid, tail_drop)                              # RouterOutput, each (B, M0max)
        tokens, layout, idx, ok = s1.chunk(enc, r, self.packed)                      # (T1, D) | (B, M1max, D)
        h, dyn = self.process(tokens, c, t_emb, layout, collect)                     # same shape
        u = s1.dechunk(layout.unpack(h), r, idx, ok, pos)                            # (B, M0max, D) fp32
        h = s1.decode(u, enc, r, c, chunks.layout, gc)                               # (T0, D) | (B, M0max, D)
        return h, dyn, StageInfo(router=r, valid=chunks.valid, kept=ok.sum(1), idx=idx, ok=ok)

    def dechunk(self, h: torch.Tensor, r: RouterOutput, chunks: Chunks) -> torch.Tensor:
        """Processed kept tokens -> every grid position (§3.4), in fp32: (B, L, D)."""
        z = chunks.layout.unpack(h)                                              # (B, Mmax, D)
        return self.dechunker(z, r.prob, chunks.idx, chunks.valid, self.grid)    # (B, L, D) fp32

    def decode(self, u: torch.Tensor, enc: torch.Tensor, r: RouterOutput, c: torch.Tensor) -> torch.Tensor:
        """u * STE(selected) + residual_proj(enc) (§3.1, H-Net), then the decoder and DiT's final layer."""
        u = ste_gate(u, r.selected).to(enc.dtype)                                # (B, L, D)
        u = u + self.residual_proj(enc)                                          # (B, L, D)
        h = self.decoder(u, c, self.grid)                                        # (B, L, E)
        h = self.final_layer(h, c)                                               # (B, L, out)
        B, L, C = h.shape
        return h.transpose(1, 2).reshape(B, C, *self.grid)                       # (B, out, H, W)

    def pos_embed(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, Mmax) raster positions -> (B, Mmax, D) sin-cos at each kept token's own (row, col): rows of
        `pos_table`, the formula evaluated once at every grid position (with pos_scale)."""
        B, m_max = idx.shape
        return self.pos_table.index_select(0, idx.reshape(-1)).view(B, m_max, -1)  # (B, Mmax, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_info: bool = False,
                tail_drop: Fraction = 0.0, force_drop_ids: Optional[torch.Tensor] = None,
                collect_blocks: bool = False):
        """x (B, C, H, W), t (B,), y (B,) -> (B, out_channels, H, W) [, ChunkInfo].

        tail_drop: elastic inference fraction f, a float or a per-sample (B,) tensor in [0, 1).
        collect_blocks: also return every inner block's output in ChunkInfo (needs return_info=True);
        activation distillation compares them with a teacher DiT's (§4.4).
        """
        if collect_blocks and not return_info:
            raise ValueError("collect_blocks=True returns the block outputs in ChunkInfo: pass return_info=True")
        c, t_emb = self.condition(t, y, force_drop_ids)                          # (B, D) x2
        enc = self.encode(x, c)                                                  # (B, L, D)
        r = self.route(enc, tail_drop if self.stage1 is None else 0.0)           # RouterOutput, each (B, L)
        chunks = self.chunk(enc, r)                                              # (T, D) | (B, Mmax, D)
        collected = [] if collect_blocks else None
        if self.stage1 is None:
            h, dyn = self.process(chunks.tokens, c, t_emb, chunks.layout, collected)  # same shape
            inner = None
        else:
            h, dyn, inner = self.process_two_stage(chunks, c, t_emb, tail_drop, collected)  # same shape
        u = self.dechunk(h, r, chunks)                                           # (B, L, D) fp32
        out = self.decode(u, enc, r, c)                                          # (B, out, H, W)
        if not return_info:
            return out
        info = ChunkInfo(router=r, kept=chunks.valid.sum(1) if inner is None else inner.kept, grid=self.grid,
                         dydit=dyn, stage1=inner)
        if collect_blocks:
            info.blocks, info.idx, info.valid = collected, chunks.idx, chunks.valid
            if inner is not None:  # the inner blocks ran on stage-1 tokens: their raster positions
                info.idx, info.valid = chunks.idx.gather(1, inner.idx), inner.ok
        return out, info

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int = 3, tail_drop: Fraction = 0.0,
                         uncond_tail_drop: Optional[float] = None, return_info: bool = False):
        """Classifier-free guidance on x = [cond half; uncond half] (DiT's convention).

        Lite-CFG: with `uncond_tail_drop` set, the conditional half keeps budget `tail_drop` and the
        unconditional half `uncond_tail_drop`, in one packed batch, so the guidance branch really
        runs fewer tokens.
        """
        n = len(x) // 2
        half = x[:n]
        fraction: Fraction = tail_drop
        if uncond_tail_drop is not None:
            fraction = torch.cat([torch.full((n,), float(tail_drop)), torch.full((n,), float(uncond_tail_drop))])
            fraction = fraction.to(x.device)
        res = self.forward(torch.cat([half, half], dim=0), t, y, return_info=return_info, tail_drop=fraction)
        out, info = res if return_info else (res, None)
        guided = guided_eps(out, cfg_scale, guide_channels, self.in_channels)
        return (guided, info) if return_info else guided


def _dcdit_factory(size: str):
    depth, hidden, heads = DIT_SIZES[size]

    def make(**kwargs) -> DCDiT:
        kwargs.setdefault("depth", depth)
        kwargs.setdefault("hidden_size", hidden)
        kwargs.setdefault("num_heads", heads)
        return DCDiT(**kwargs)

    make.__name__ = f"DCDiT_{size}"
    return make


# Inner DiT sizes as DiT's registry; the compression target N is a config value (downsample_factor).
DCDiT_models = {f"DCDiT-{size}": _dcdit_factory(size) for size in DIT_SIZES}
