"""DyDiT gates on DC-DiT's inner blocks (paper §4.5; Zhao et al., "Dynamic Diffusion Transformer", 2024).

Two kinds of dynamic computation inside every inner DiT block (docs/architecture.md, "DyDiT"):
- timestep-wise dynamic width: from the timestep embedding t_emb (B, D), a Linear(D, H) scores the H
  attention heads and another Linear(D, H) the H groups of MLP hidden channels (the MLP hidden width
  split into H equal groups); a skipped head contributes nothing to the attention projection, a skipped
  group nothing to fc2;
- spatial-wise dynamic tokens: a per-token router Linear(D, D/16) -> ReLU -> Linear(D/16, 1) on the
  residual stream after attention decides whether a token runs the MLP at all.
Gates are straight-through Gumbel-sigmoids (tau 5 in training, hard at 0.5 in the forward pass; a
plain sigmoid > 0.5 at inference), initialised fully on (router biases 15 for the width gates, 35 for
the token gate, as the DyDiT release), so a fresh DyDiT computes exactly its DC-DiT. `DyDiTBlock`
subclasses DiTBlock, so the wrapped block keeps DiT's parameter names (`blocks.i.attn.qkv.weight`) and a
DC-DiT checkpoint loads into it with only the new router parameters left at their init.

Execution (`DyDiTBlock.execution`, set with `dydit_execution`):
- "masked" (training): every head, channel and token is computed and the gates multiply them, so the
  straight-through gradient reaches the routers;
- "sliced" (inference): skipped work is not computed. Width gates depend on t only, so the samples of a
  batch fall into few distinct gate patterns (one per timestep in a sampling loop, where every row shares
  t; the CFG halves share it too). Each pattern's samples run with their heads' rows of qkv / columns of
  proj and their groups' rows of fc1 / columns of fc2 (index_select on the weights); only tokens whose gate
  is on are gathered into the MLP and its update is index_add-ed back. With one pattern (the usual case)
  the attention runs on the batch as it is, without any gather;
- "static": the plain DC-DiT block (no routers at all), for FLOPs baselines and side-by-side timing;
- "auto" (default): masked while training, sliced in eval mode.
The forward's gate decisions and FLOPs come back in `DyDiTInfo` (ChunkInfo.dydit), never cached here.

FLOPs (paper §4.5, DyDiT's loss): per sample, the inner blocks' forward FLOPs in the convention of
models/flops.py (2 per multiply-add of matmuls and attention products) from the gates; F_static is the same
blocks with every gate on and no routers at the same kept-token count M (the DC-DiT DyDiT composes with);
L_FLOPs = (mean_b F_dyn / F_static - lambda)^2, differentiable through the straight-through gates.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import TokenLayout, _packed_attention
from .checkpoint_io import model_state, read_checkpoint
from .flops import BlockDims, block_flops, static_block_flops
from .dit import DiTBlock, modulate

WIDTH_BIAS_INIT = 15.0   # DyDiT release: head/group router bias, sigmoid(15) ~ 1 - 3e-7, every width gate on
TOKEN_BIAS_INIT = 35.0   # DyDiT release: token router bias, every token runs the MLP
TOKEN_ROUTER_REDUCTION = 16  # token router hidden width D / 16 (DyDiT release)
EXECUTIONS = ("auto", "masked", "sliced", "static")
GATE_PREFIXES = ("head_router.", "group_router.", "token_router.")  # parameter names DyDiT adds to a block


class DyDiTError(ValueError):
    """A bad DC-DiT checkpoint for DyDiT fine-tuning (printed as one line by scripts)."""
    user_error = True


# ----------------------------------------------------------------------------- gates

class _HardGate(torch.autograd.Function):
    """Straight-through: forward gives exact 0/1 (soft > 0.5), backward hands the gradient to soft unchanged.

    Exact 0/1 (not hard - soft.detach() + soft, which rounds to 1 +- 1 ulp) keeps a fully-on DyDiT bit for
    bit equal to its DC-DiT.
    """

    @staticmethod
    def forward(ctx, soft):
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def gumbel_sigmoid_gate(logits: Tensor, tau: float, training: bool) -> Tensor:
    """Hard 0/1 gates carrying a soft gradient (DyDiT's straight-through Gumbel-sigmoid).

    training: soft = sigmoid((logits + g1 - g2) / tau) with g1, g2 ~ Gumbel(0, 1), so exploration noise
    decides gates near the threshold; inference: soft = sigmoid(logits), deterministic (on iff logit > 0).
    """
    if training:
        e = torch.empty_like(logits).exponential_()                     # Exp(1); -log(e) ~ Gumbel(0, 1)
        f = torch.empty_like(logits).exponential_()
        soft = torch.sigmoid((logits + f.log() - e.log()) / tau)       # g1 - g2 = log f - log e
    else:
        soft = torch.sigmoid(logits)
    return _HardGate.apply(soft)


def _fp32_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """A router layer in float32 whatever the model or autocast dtype: under bf16 a logit near 0 could
    otherwise round across the threshold (the same reason models/routing.py routes in fp32)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


# ----------------------------------------------------------------------------- the block

class DyDiTBlock(DiTBlock):
    """DiTBlock (adaLN-Zero) with DyDiT's head, MLP-group and token gates.

    forward(x, c, layout, t_emb) -> (x, head (B, H), group (B, H), token) where the gates are float 0/1
    with a straight-through gradient and token is (T,) for a packed layout or (B, Mmax) for a padded one
    (padding slots included; callers mask them). In "static" execution the three gates are None.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, tau: float = 5.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        mlp_hidden = self.mlp.fc1.out_features
        if mlp_hidden % num_heads:
            raise ValueError(f"DyDiT splits the MLP hidden width into num_heads groups: hidden {mlp_hidden} "
                             f"(hidden_size {hidden_size} x mlp_ratio {mlp_ratio}) is not divisible by "
                             f"num_heads {num_heads}")
        if hidden_size < TOKEN_ROUTER_REDUCTION:
            raise ValueError(f"DyDiT's token router is D/{TOKEN_ROUTER_REDUCTION} wide: hidden_size must be >= "
                             f"{TOKEN_ROUTER_REDUCTION}, got {hidden_size}")
        if not tau > 0:
            raise ValueError(f"DyDiT Gumbel-sigmoid temperature tau must be > 0, got {tau}")
        self.num_heads = num_heads
        self.tau = tau
        self.execution = "auto"
        r = hidden_size // TOKEN_ROUTER_REDUCTION
        self.dims = BlockDims(hidden_size, num_heads, hidden_size // num_heads, mlp_hidden // num_heads, r)
        self.head_router = nn.Linear(hidden_size, num_heads)
        self.group_router = nn.Linear(hidden_size, num_heads)
        self.token_router = nn.Sequential(nn.Linear(hidden_size, r), nn.ReLU(), nn.Linear(r, 1))
        self.reset_gates()

    def reset_gates(self) -> None:
        """Routers as the DyDiT release: xavier weights, first token-router layer zero bias, and the output
        biases high (15 width, 35 token) so every gate starts on and the block is its DiT block."""
        for layer in (self.head_router, self.group_router, self.token_router[0], self.token_router[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.head_router.bias, WIDTH_BIAS_INIT)
        nn.init.constant_(self.group_router.bias, WIDTH_BIAS_INIT)
        nn.init.constant_(self.token_router[2].bias, TOKEN_BIAS_INIT)

    def _mode(self) -> str:
        if self.execution not in EXECUTIONS:
            raise ValueError(f"DyDiTBlock.execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.execution == "auto":
            return "masked" if self.training else "sliced"
        return self.execution

    def width_gates(self, t_emb: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, D) timestep embedding -> head gates (B, H), group gates (B, H) (timestep-wise width)."""
        with torch.autocast(device_type=t_emb.device.type, enabled=False):
            head = gumbel_sigmoid_gate(_fp32_linear(self.head_router, t_emb), self.tau, self.training)
            group = gumbel_sigmoid_gate(_fp32_linear(self.group_router, t_emb), self.tau, self.training)
        return head, group                                                       # (B, H) each

    def token_gates(self, x: Tensor) -> Tensor:
        """Residual stream (T, D) | (B, N, D) -> gate per token (T,) | (B, N) (spatial-wise tokens)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = F.relu(_fp32_linear(self.token_router[0], x))                    # (..., D/16)
            logits = _fp32_linear(self.token_router[2], h).squeeze(-1)           # (T,) | (B, N)
            return gumbel_sigmoid_gate(logits, self.tau, self.training)

    def forward(self, x: Tensor, c: Tensor, layout: Optional[TokenLayout] = None, t_emb: Optional[Tensor] = None):
        if layout is None or t_emb is None:
            raise ValueError("DyDiTBlock runs inside DC-DiT: pass the TokenLayout and the timestep embedding t_emb")
        mode = self._mode()
        if mode == "static":
            return super().forward(x, c, layout), None, None, None
        mod_sample = self.adaLN_modulation(c)                                    # (B, 6D)
        mod = layout.per_token(mod_sample)                                       # (T, 6D) | (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        head, group = self.width_gates(t_emb)                                    # (B, H) each
        a = modulate(self.norm1(x), shift_msa, scale_msa)                        # same shape as x
        if mode == "masked":
            x = x + gate_msa * self._attention_masked(a, layout, head)           # same shape as x
        else:
            x = x + gate_msa * self._attention_sliced(a, layout, head)           # same shape as x
        token = self.token_gates(x)                                              # (T,) | (B, Mmax)
        m = modulate(self.norm2(x), shift_mlp, scale_mlp)                        # same shape as x
        if mode == "masked":
            update = gate_mlp * self._mlp_masked(m, layout, group)               # same shape as x
            x = x + token.unsqueeze(-1).to(update.dtype) * update                # same shape as x
        else:
            x = self._mlp_sliced(x, m, gate_mlp, mod_sample.chunk(6, dim=-1)[5], layout, group, token)
        return x, head, group, token

    # ---- attention

    def _attention_masked(self, a: Tensor, layout: TokenLayout, head: Tensor) -> Tensor:
        """Attention.forward with each head's output multiplied by its gate before proj (DyDiT's mask)."""
        attn, H = self.attn, self.num_heads
        if layout.packed:
            T, D = a.shape
            q, k, v = attn.qkv(a).view(T, 3, H, D // H).transpose(0, 1).contiguous().unbind(0)  # 3 x (T, H, Dh)
            out = _packed_attention(q, k, v, layout)                             # (T, H, Dh)
            out = out * layout.per_token(head).unsqueeze(-1).to(out.dtype)       # (T, H, Dh)
            return attn.proj(out.reshape(T, D))                                  # (T, D)
        B, N, D = a.shape
        qkv = attn.qkv(a).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)        # (3, B, H, N, Dh)
        mask = layout.valid[:, None, None, :]                                    # (B, 1, 1, N)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # (B, H, N, Dh)
        out = out * head[:, :, None, None].to(out.dtype)                         # (B, H, N, Dh)
        return attn.proj(out.transpose(1, 2).reshape(B, N, D))                   # (B, N, D)

    def _attention_sliced(self, a: Tensor, layout: TokenLayout, head: Tensor) -> Tensor:
        """Attention over each sample's kept heads only, one pass per distinct head pattern."""
        patterns = gate_patterns(head)
        if len(patterns) == 1 and bool(patterns[0][1].numel() == self.num_heads):
            return self.attn(a, layout)                                          # every head: DiT's path
        if len(patterns) == 1:  # one pattern for the whole batch (a sampling step): no gather
            return _sliced_attention(self.attn, a, layout, patterns[0][1])
        out = torch.zeros_like(a)
        for samples, kept in patterns:
            rows, sub_layout = _sample_rows(layout, samples)
            part = _sliced_attention(self.attn, a.index_select(0, rows), sub_layout, kept)
            out = out.index_copy(0, rows, part.to(out.dtype))                    # same shape as a
        return out

    # ---- MLP

    def _mlp_masked(self, m: Tensor, layout: TokenLayout, group: Tensor) -> Tensor:
        """fc2(GELU(fc1(m) * group mask)): a skipped group's channels are 0 after GELU and add nothing."""
        mlp, gc = self.mlp, self.dims.group_width
        mask = layout.per_token(group).repeat_interleave(gc, dim=-1)             # (T, hidden) | (B, 1, hidden)
        h = mlp.fc1(m)                                                           # (..., hidden)
        return mlp.fc2(mlp.act(h * mask.to(h.dtype)))                            # (..., D)

    def _mlp_sliced(self, x: Tensor, m: Tensor, gate_mlp: Tensor, gate_sample: Tensor, layout: TokenLayout,
                    group: Tensor, token: Tensor) -> Tensor:
        """x + gate_mlp * MLP(m) on the tokens whose gate is on, over their sample's kept groups only.

        gate_mlp is the adaLN gate per token ((T, D) | (B, 1, D)), gate_sample the same per sample (B, D).
        """
        run = token > 0.5                                                        # (T,) | (B, Mmax)
        if not layout.packed:
            run = run & layout.valid                                             # padding never runs
        patterns = gate_patterns(group)
        all_groups = len(patterns) == 1 and patterns[0][1].numel() == self.num_heads
        if all_groups and bool(run.sum() == layout.valid.sum()):
            return x + gate_mlp * self.mlp(m)                                    # every token: DiT's path
        D = x.shape[-1]
        flat_x, flat_m, flat_run = x.reshape(-1, D), m.reshape(-1, D), run.reshape(-1)  # (B*Mmax | T, ...)
        sample = _token_sample(layout)                                           # (B*Mmax | T,) long
        for samples, kept in patterns:
            chosen = flat_run if len(patterns) == 1 else flat_run & torch.isin(sample, samples)  # (B*Mmax | T,)
            idx = chosen.nonzero().squeeze(1)                                    # (K,)
            if idx.numel() == 0:
                continue
            y = _sliced_mlp(self.mlp, flat_m.index_select(0, idx), kept, self.dims.group_width)  # (K, D)
            y = gate_sample.index_select(0, sample.index_select(0, idx)).to(y.dtype) * y       # (K, D)
            flat_x = flat_x.index_add(0, idx, y.to(flat_x.dtype))                # (B*Mmax | T, D)
        return flat_x.view_as(x)


# ----------------------------------------------------------------------------- sliced kernels

def gate_patterns(gates: Tensor) -> List[Tuple[Tensor, Tensor]]:
    """Group samples by their gate pattern: (B, K) 0/1 -> [(samples (n,) long, kept (k,) long), ...].

    One host sync (the number of distinct patterns and their kept indices). Width gates depend on t
    only, so a sampling step (every row at the same t) has one pattern.
    """
    on = gates.detach() > 0.5                                                    # (B, K)
    unique, inverse = torch.unique(on, dim=0, return_inverse=True)               # (P, K), (B,)
    out = []
    for p in range(unique.shape[0]):
        samples = (inverse == p).nonzero().squeeze(1)                            # (n,)
        out.append((samples, unique[p].nonzero().squeeze(1)))                    # (k,)
    return out


def _sample_rows(layout: TokenLayout, samples: Tensor) -> Tuple[Tensor, TokenLayout]:
    """Rows of the block input holding `samples` (sorted): packed -> token indices (T_s,) and the layout of
    those samples alone; padded -> the sample indices themselves and their sub-layout."""
    sub = TokenLayout.build(layout.valid.index_select(0, samples), layout.packed)
    if not layout.packed:
        return samples, sub
    return torch.isin(layout.batch_idx, samples).nonzero().squeeze(1), sub      # (T_s,) in packed order


def _token_sample(layout: TokenLayout) -> Tensor:
    """Sample of every row of the flattened block input: packed (T,), padded (B * Mmax,)."""
    if layout.packed:
        return layout.batch_idx                                                  # (T,)
    B, Mmax = layout.valid.shape
    return torch.arange(B, device=layout.valid.device).repeat_interleave(Mmax)   # (B*Mmax,)


def _sliced_attention(attn: nn.Module, a: Tensor, layout: TokenLayout, kept: Tensor) -> Tensor:
    """Attention computed for the heads in `kept` only: their rows of qkv, their columns of proj.

    Equal to the masked path (skipped heads' outputs are zeroed before proj); with no head left the
    result is proj's bias, as there.
    """
    H = attn.num_heads
    D = attn.qkv.in_features
    dh, h = D // H, kept.numel()
    w = attn.qkv.weight.view(3, H, dh, D).index_select(1, kept).reshape(3 * h * dh, D)  # (3 h Dh, D)
    b = attn.qkv.bias.view(3, H, dh).index_select(1, kept).reshape(3 * h * dh)          # (3 h Dh,)
    wp = attn.proj.weight.view(D, H, dh).index_select(1, kept).reshape(D, h * dh)       # (D, h Dh)
    if h == 0:
        return F.linear(a.new_zeros(*a.shape[:-1], 0), wp, attn.proj.bias)      # proj(0) = bias
    if layout.packed:
        T = a.shape[0]
        qkv = F.linear(a, w, b).view(T, 3, h, dh)                                # (T, 3, h, Dh)
        if a.is_cuda:  # contiguous q/k/v, as Attention.forward: jagged SDPA rejects strided views on some builds
            q, k, v = qkv.transpose(0, 1).contiguous().unbind(0)                 # 3 x (T, h, Dh)
        else:  # the CPU kernel reads the strided views in place
            q, k, v = qkv.unbind(1)                                              # 3 x (T, h, Dh) views
        out = _packed_attention(q, k, v, layout).reshape(T, h * dh)             # (T, h Dh)
    else:
        B, N, _ = a.shape
        qkv = F.linear(a, w, b).view(B, N, 3, h, dh).permute(2, 0, 3, 1, 4)      # (3, B, h, N, Dh)
        mask = layout.valid[:, None, None, :]                                    # (B, 1, 1, N)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # (B, h, N, Dh)
        out = out.transpose(1, 2).reshape(B, N, h * dh)                          # (B, N, h Dh)
    return F.linear(out, wp, attn.proj.bias)                                     # (..., D)


def _sliced_mlp(mlp: nn.Module, m: Tensor, kept: Tensor, group_width: int) -> Tensor:
    """fc2(GELU(fc1(m))) over the channel groups in `kept` only: (K, D) -> (K, D)."""
    D = m.shape[-1]
    G = mlp.fc1.out_features // group_width
    w1 = mlp.fc1.weight.view(G, group_width, D).index_select(0, kept).reshape(-1, D)       # (g Gc, D)
    b1 = mlp.fc1.bias.view(G, group_width).index_select(0, kept).reshape(-1)               # (g Gc,)
    w2 = mlp.fc2.weight.view(D, G, group_width).index_select(1, kept).reshape(D, -1)       # (D, g Gc)
    return F.linear(mlp.act(F.linear(m, w1, b1)), w2, mlp.fc2.bias)             # (K, D)


# ----------------------------------------------------------------------------- the stack and its info

@dataclass
class DyDiTInfo:
    """Gate decisions and FLOPs of one forward's inner blocks (ChunkInfo.dydit; returned, never cached)."""
    heads: Tensor         # (B, depth, H) float 0/1 attention-head gates (straight-through gradient)
    groups: Tensor        # (B, depth, H) float 0/1 MLP channel-group gates
    tokens: Tensor        # (B, depth) float, tokens that ran the MLP (sum of token gates over kept tokens)
    kept: Tensor          # (B,) long, M: tokens the inner blocks ran on
    flops: Tensor         # (B,) float32 forward FLOPs of the inner blocks as gated (routers included)
    static_flops: Tensor  # (B,) float32 the same blocks as a plain DC-DiT at the same M
    gated: bool = True    # False when the blocks ran in "static" execution (no routers, every gate on)

    @property
    def ratio(self) -> Tensor:
        """(B,) F_dynamic / F_static."""
        return self.flops / self.static_flops


class GateTally:
    """The gate decisions and FLOPs of one forward's DyDiT blocks, block by block -> DyDiTInfo.

    DCDiT.process calls `add` after each block; `info()` is what the forward returns in ChunkInfo.dydit.
    """

    def __init__(self, layout: TokenLayout, c: Tensor):
        self.layout = layout
        self.B, self.device = c.shape[0], c.device
        self.kept = layout.valid.sum(1)                                          # (B,)
        self.heads, self.groups, self.tokens = [], [], []
        self.flops = torch.zeros(self.B, device=self.device)
        self.static = torch.zeros(self.B, device=self.device)
        self.gated = True

    def add(self, dims: BlockDims, head: Optional[Tensor], group: Optional[Tensor], token: Optional[Tensor]) -> None:
        M = self.kept.float()                                                    # (B,)
        if head is None:  # static execution: every gate on, no routers
            head = group = torch.ones(self.B, dims.heads, device=self.device)   # (B, H)
            run = M                                                              # (B,)
            self.flops = self.flops + static_block_flops(dims, M)
            self.gated = False
        else:
            if self.layout.packed:
                run = torch.zeros(self.B, device=self.device).index_add(0, self.layout.batch_idx, token.float())
            else:
                run = (token.float() * self.layout.valid).sum(1)                 # (B,)
            self.flops = self.flops + block_flops(dims, M, head.sum(1), group.sum(1), run)
        self.static = self.static + static_block_flops(dims, M)
        self.heads.append(head)
        self.groups.append(group)
        self.tokens.append(run)

    def info(self) -> "DyDiTInfo":
        return DyDiTInfo(heads=torch.stack(self.heads, 1), groups=torch.stack(self.groups, 1),
                         tokens=torch.stack(self.tokens, 1), kept=self.kept, flops=self.flops,
                         static_flops=self.static, gated=self.gated)


def flops_ratio(info: DyDiTInfo, dcdit_coeffs: Optional[Sequence[float]] = None) -> Tensor:
    """(B,) F_dynamic / F_static: of the inner blocks (the default), or, given the DC-DiT's forward FLOPs
    a + b M + c M^2 (models.flops.dcdit_flops_coeffs), of the whole forward, the scaffold (encoder, router,
    dechunk, decoder) counted on both sides (config dydit.flops_scope, docs/dydit.md)."""
    if dcdit_coeffs is None:
        return info.ratio
    a, b, c = (float(v) for v in dcdit_coeffs)
    M = info.kept.float()                                                        # (B,)
    total = a + b * M + c * M * M                                                # (B,) the DC-DiT forward
    return (info.flops + total - info.static_flops) / total


def flops_loss(info: DyDiTInfo, target_ratio: float, dcdit_coeffs: Optional[Sequence[float]] = None) -> Tensor:
    """DyDiT's FLOPs loss (mean_b F_dyn / F_static - lambda)^2, in float32 (scope as flops_ratio)."""
    return (flops_ratio(info, dcdit_coeffs).float().mean() - target_ratio) ** 2


# ----------------------------------------------------------------------------- model-level helpers

def dydit_blocks(model: nn.Module) -> List[DyDiTBlock]:
    return [m for m in model.modules() if isinstance(m, DyDiTBlock)]


@contextmanager
def dydit_execution(model: nn.Module, mode: str):
    """Temporarily run every DyDiT block of `model` as `mode` (one of EXECUTIONS)."""
    if mode not in EXECUTIONS:
        raise ValueError(f"DyDiT execution must be one of {EXECUTIONS}, got {mode!r}")
    blocks = dydit_blocks(model)
    before = [b.execution for b in blocks]
    for b in blocks:
        b.execution = mode
    try:
        yield model
    finally:
        for b, mode_before in zip(blocks, before):
            b.execution = mode_before


@torch.no_grad()
def fix_gates(model: nn.Module, heads: Sequence[int], groups: Sequence[int], tokens: Optional[bool] = True) -> None:
    """Set every DyDiT router so the gates take a fixed pattern whatever t and x (tests, benchmarks):
    block i keeps the first heads[i] heads and the first groups[i] MLP groups; tokens True / False runs
    every / no token through the MLP, None leaves the token router as it is.
    """
    blocks = dydit_blocks(model)
    if len(heads) != len(blocks) or len(groups) != len(blocks):
        raise ValueError(f"fix_gates: expected one head and one group count per block ({len(blocks)} blocks), "
                         f"got {len(heads)} and {len(groups)}")
    for block, h, g in zip(blocks, heads, groups):
        H = block.num_heads
        if not (0 <= h <= H and 0 <= g <= H):
            raise ValueError(f"fix_gates: kept heads {h} and groups {g} must lie in [0, {H}]")
        for router, k in ((block.head_router, h), (block.group_router, g)):
            router.weight.zero_()
            router.bias.copy_(torch.where(torch.arange(H) < k, WIDTH_BIAS_INIT, -WIDTH_BIAS_INIT))
        if tokens is not None:
            block.token_router[2].weight.zero_()
            block.token_router[2].bias.fill_(TOKEN_BIAS_INIT if tokens else -TOKEN_BIAS_INIT)


# ----------------------------------------------------------------------------- fine-tuning from DC-DiT

def read_dcdit_checkpoint(path: str, what: str = "dydit.init_checkpoint") -> Tuple[dict, str]:
    """The DC-DiT weights DyDiT fine-tunes from -> (state_dict, which one).

    A training checkpoint of this repo ({"model", "ema", ...}: its EMA weights, the ones the paper
    evaluates and so the DC-DiT DyDiT composes with), {"model": ...}, or a bare state dict.
    `what` names the setting in error messages.
    """
    ckpt = read_checkpoint(path, what, DyDiTError, "a DC-DiT training checkpoint")
    state, which = model_state(ckpt)
    if state is None:
        raise DyDiTError(f"{what} {path}: {which}; expected a training checkpoint with 'ema'/'model' or a "
                         f"state dict of tensors")
    return state, which


def load_dcdit_weights(model: nn.Module, state: dict, path: str = "checkpoint") -> List[str]:
    """Load every DC-DiT weight of `state` into the DyDiT `model`, strictly: each of the model's keys except
    the gate routers must be in `state` with its shape, and `state` may hold nothing else (in particular no
    gate keys: fine-tuning starts from a DC-DiT, not from a DyDiT). Returns the gate keys left at their init.
    """
    own = model.state_dict()
    gate_keys = [k for k in own if k.split(".", 2)[-1].startswith(GATE_PREFIXES) and k.startswith("blocks.")]
    if not gate_keys:
        raise DyDiTError("dydit.init_checkpoint: the model has no DyDiT gates (set dydit.enabled=true)")
    extra = [k for k in state if k not in own or k in gate_keys]
    if extra:
        raise DyDiTError(f"{extra[0]}: in {path} but not a DC-DiT weight of this model ({len(extra)} such keys); "
                         f"expected a DC-DiT checkpoint of the same size (model.* must match)")
    missing = [k for k in own if k not in state and k not in gate_keys]
    if missing:
        raise DyDiTError(f"{missing[0]}: missing from {path} ({len(missing)} DC-DiT keys missing); expected a "
                         f"DC-DiT checkpoint of the same model")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise DyDiTError(f"{k}: {path} has shape {list(v.shape)} vs model {list(own[k].shape)} "
                             f"(model.hidden_size/depth/num_heads must match the DC-DiT)")
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and sorted(result.missing_keys) == sorted(gate_keys), result
    return gate_keys
