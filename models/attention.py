"""One attention entry point for DiT blocks over dense, padded or packed token sets (DESIGN.md §4).

DC-DiT's inner blocks see a different number of kept tokens M_b per sample. Two layouts:
- padded: (B, Mmax, D) with a key-padding mask; simple, but padding slots cost FLOPs everywhere.
- packed: the valid tokens of all samples concatenated, (T, D) with T = sum_b M_b and cu_seqlens
  offsets (the flash-attn varlen convention). No FLOPs are spent on padding in any layer.
Both give the same numbers to fp32 tolerance; a plain DiT uses neither (layout=None, dense).

The packed path picks the fastest exact kernel available:
- CUDA/ROCm fp16/bf16: flash-attn's varlen kernel when importable, else PyTorch's own
  `torch.nn.attention.varlen.varlen_attn` (no flash-attn build needed);
- other GPU dtypes: jagged nested tensors through `scaled_dot_product_attention`;
- CPU: no varlen kernel exists, so each sample's slice of the packed tokens goes through the fused
  SDPA kernel (`split` views, one `cat`). Measured on 2 CPU cores, B=64, H=4, Dh=32, M ~ U(2, 460),
  forward+backward: 0.06 s, vs 0.40 s padded with a key mask and 2.5 s for jagged SDPA (its CPU
  path is unfused math). No FLOPs are spent on padding on any of these paths.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: source-only CUDA build, never a requirement
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None
try:  # PyTorch's own varlen flash attention (CUDA only), present in recent releases
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the torch version
    varlen_attn = None


@dataclass
class TokenLayout:
    """Where the inner tokens of a batch live; built once per forward, shared by every block."""
    valid: torch.Tensor        # (B, Mmax) bool, real (kept) slots; padding slots are False
    packed: bool               # True: blocks run on (T, D); False: on (B, Mmax, D) with a key mask
    cu_seqlens: torch.Tensor   # (B+1,) int32 offsets of each sample in the packed token axis
    max_seqlen: int            # Mmax
    batch_idx: torch.Tensor    # (T,) long, sample of each packed token
    flat_idx: torch.Tensor     # (T,) long, position of each packed token in the flattened (B*Mmax,) slots
    seqlens: list              # B python ints M_b (host copy; the CPU kernel splits by them)

    @classmethod
    def build(cls, valid: torch.Tensor, packed: bool, seqlens: Optional[list] = None) -> "TokenLayout":
        """valid (B, Mmax) with each sample's real slots first (as `chunk` lays them out).

        seqlens: the B kept counts already on the host (`chunk(..., return_counts=True)`), so building the
        layout costs no further host sync; without them they are read once here. A padded layout needs none.
        """
        B, Mmax = valid.shape
        device = valid.device
        empty = torch.zeros(0, dtype=torch.long, device=device)
        if not packed:
            cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
            cu[1:] = valid.sum(1).cumsum(0)
            return cls(valid, False, cu, Mmax, empty, empty, [])
        if seqlens is None:
            seqlens = valid.sum(1).tolist()                               # host sync: sizes of the packed axis
        T = int(sum(seqlens))
        counts = torch.tensor(seqlens, dtype=torch.long, device=device)   # (B,) host -> device, no sync
        starts = counts.cumsum(0) - counts                                # (B,) first packed token of each sample
        cu = torch.cat([starts, starts[-1:] + counts[-1:]]).int()         # (B+1,)
        batch_idx = torch.repeat_interleave(torch.arange(B, device=device), counts, output_size=T)  # (T,)
        slot = torch.arange(T, device=device) - starts.index_select(0, batch_idx)                  # (T,)
        flat_idx = batch_idx * Mmax + slot                                # (T,)
        return cls(valid, True, cu, Mmax, batch_idx, flat_idx, list(seqlens))

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Mmax, D) -> (T, D) if packed, else unchanged."""
        if not self.packed:
            return z
        return z.flatten(0, 1).index_select(0, self.flat_idx)            # (T, D)

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (B, Mmax, D) with zeros at padding; a padded layout is returned unchanged."""
        if not self.packed:
            return h
        B, Mmax = self.valid.shape
        out = h.new_zeros(B * Mmax, h.shape[-1])
        out = out.index_copy(0, self.flat_idx, h)                         # (B*Mmax, D)
        return out.view(B, Mmax, -1)                                      # (B, Mmax, D)

    def per_token(self, v: torch.Tensor) -> torch.Tensor:
        """Per-sample vectors (B, K) broadcastable against the tokens: (T, K) packed, (B, 1, K) padded."""
        if self.packed:
            return v.index_select(0, self.batch_idx)                      # (T, K)
        return v.unsqueeze(1)                                             # (B, 1, K)


@torch.compiler.disable
def _packed_attention_cpu(q, k, v, seqlens: list) -> torch.Tensor:
    """The CPU packed path: each sample's slice through the fused SDPA kernel. Left out of torch.compile
    (a graph break): Inductor cannot lower the backward of a loop over data-dependent slice lengths, and
    the fused kernel is what it would call anyway."""
    outs = [F.scaled_dot_product_attention(a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1)).transpose(0, 1)
            for a, b, c in zip(*(t.split(seqlens) for t in (q, k, v)))]  # each (M_b, H, Dh)
    return torch.cat(outs)                                                # (T, H, Dh)


def _packed_attention(q, k, v, layout: TokenLayout) -> torch.Tensor:
    """q, k, v (T, H, Dh) -> (T, H, Dh), each sample attending only to its own tokens."""
    m = layout.max_seqlen
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(q, k, v, layout.cu_seqlens, layout.cu_seqlens, m, m)
        if varlen_attn is not None:
            return varlen_attn(q, k, v, layout.cu_seqlens, layout.cu_seqlens, m, m)
    if not q.is_cuda:
        return _packed_attention_cpu(q, k, v, layout.seqlens)             # (T, H, Dh)
    offsets = layout.cu_seqlens.long()
    nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t, offsets, max_seqlen=layout.max_seqlen)
                  .transpose(1, 2) for t in (q, k, v))                    # (B, H, j, Dh) jagged
    out = F.scaled_dot_product_attention(nq, nk, nv)                      # (B, H, j, Dh) jagged
    return out.transpose(1, 2).values()                                   # (T, H, Dh)


class Attention(nn.Module):
    """Multi-head self-attention with DiT's parameter names (`qkv`, `proj`, qkv with bias)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        H = self.num_heads
        if layout is not None and layout.packed:
            T, D = x.shape
            qkv = self.qkv(x).view(T, 3, H, D // H)                       # (T, 3, H, Dh)
            if x.is_cuda:  # contiguous q/k/v: jagged SDPA rejects strided views on some builds (it probes kernels)
                q, k, v = qkv.transpose(0, 1).contiguous().unbind(0)      # 3 x (T, H, Dh)
            else:  # CPU SDPA takes the strided per-sample views as they are: the copy cost 5% of a B step
                q, k, v = qkv.unbind(1)                                   # 3 x (T, H, Dh) views
            out = _packed_attention(q, k, v, layout).reshape(T, D)        # (T, D)
            return self.proj(out)
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        mask = None if layout is None else layout.valid[:, None, None, :]  # (B, 1, 1, N) key mask
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))            # (B, N, D)
