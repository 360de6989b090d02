"""One attention entry point for DiT blocks over dense, padded or packed token sets (docs/architecture.md).

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
  CPU attention kernel, inside one custom operator (`dcdit::packed_attention`, backward included) that
  torch.compile keeps in its graph; far faster on CPU than padding with a key mask or jagged SDPA
  (whose CPU path is unfused math; docs/performance.md). No FLOPs are spent on padding on any path.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .flops import attention_backward_flops, attention_flops

# The varlen kernels run on CUDA/ROCm only, so a machine without a GPU does not import them: importing PyTorch's
# loads torch._dynamo, about a second of every CPU process's start.
flash_attn_varlen_func = varlen_attn = None
if torch.cuda.is_available():  # pragma: no cover - depends on the machine
    try:  # optional: source-only CUDA build, never a requirement
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        pass
    try:  # PyTorch's own varlen flash attention (CUDA only), present in recent releases
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # depends on the torch version
        pass


@dataclass
class TokenLayout:
    """Where the inner tokens of a batch live; built once per forward, shared by every block."""
    valid: torch.Tensor        # (B, Mmax) bool, real (kept) slots; padding slots are False
    packed: bool               # True: blocks run on (T, D); False: on (B, Mmax, D) with a key mask
    cu_seqlens: torch.Tensor   # (B+1,) int32 offsets of each sample in the packed token axis
    max_seqlen: int            # Mmax
    batch_idx: torch.Tensor    # (T,) long, sample of each packed token
    flat_idx: torch.Tensor     # (T,) long, position of each packed token in the flattened (B*Mmax,) slots

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
            return cls(valid, False, cu, Mmax, empty, empty)
        if seqlens is None:
            seqlens = valid.sum(1).tolist()                               # host sync: sizes of the packed axis
        T = int(sum(seqlens))
        counts = torch.tensor(seqlens, dtype=torch.long, device=device)   # (B,) host -> device, no sync
        starts = counts.cumsum(0) - counts                                # (B,) first packed token of each sample
        cu = torch.cat([starts, starts[-1:] + counts[-1:]]).int()         # (B+1,)
        batch_idx = torch.repeat_interleave(torch.arange(B, device=device), counts, output_size=T)  # (T,)
        slot = torch.arange(T, device=device) - starts.index_select(0, batch_idx)                  # (T,)
        flat_idx = batch_idx * Mmax + slot                                # (T,)
        return cls(valid, True, cu, Mmax, batch_idx, flat_idx)

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


# ----------------------------------------------------------------------------- CPU packed attention operator
# torch.compile cannot trace a loop whose slice lengths are data (Inductor failed lowering its backward), so the
# CPU loop is one opaque custom operator, dcdit::packed_attention, with its backward another: compile keeps both
# in the graph as single nodes (their fakes give the shapes) instead of breaking the graph around them. The
# lengths come in as the (B+1,) cu_seqlens tensor, never a python list, so a new set of lengths is new data,
# not a recompile. Each sample goes through PyTorch's fused CPU attention kernel and its backward, which read
# the strided (M_b, H, Dh) slices in place (any strides with a unit last one) and share the forward's logsumexp.

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel's logsumexp dtype: its accumulation type (float64 for float64, float32 otherwise)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _seqlens(cu_seqlens: torch.Tensor, total: int) -> list:
    """cu_seqlens (B+1,) -> the B lengths M_b as python ints, checked to rise from 0 to T (a CPU tensor: no sync)."""
    bounds = cu_seqlens.tolist()
    lens = [e - s for s, e in zip(bounds, bounds[1:])]
    if not bounds or bounds[0] != 0 or bounds[-1] != total or min(lens, default=0) < 0:
        raise ValueError(f"packed attention: cu_seqlens must rise from 0 to T={total}, got {bounds}")
    return lens


def _per_sample(t: torch.Tensor, lens: list) -> tuple:
    """(T, H, ...) -> B views (1, H, M_b, ...), the kernel's layout. Rows of Dh must be unit-stride (any other
    strides the kernel reads as they are), so only a tensor without that is copied."""
    t = t if t.dim() < 3 or t.stride(-1) == 1 else t.contiguous()
    return t.transpose(0, 1).unsqueeze(0).split_with_sizes(lens, dim=2)  # B x (1, H, M_b, ...)


@torch.library.custom_op("dcdit::packed_attention", mutates_args=(), device_types="cpu")
def _cpu_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (T, H, Dh), cu_seqlens (B+1,) -> out (T, H, Dh) and logsumexp (T, H) for the backward."""
    T, H, _ = q.shape
    lens = _seqlens(cu_seqlens, T)
    out = q.new_empty(q.shape)                                            # (T, H, Dh)
    lse = q.new_empty((T, H), dtype=_lse_dtype(q.dtype))                  # (T, H)
    samples = zip(*(_per_sample(t, lens) for t in (q, k, v, out, lse)))   # B x ((1, H, M_b, Dh) x4, (1, H, M_b))
    for qb, kb, vb, out_b, lse_b in samples:
        if qb.shape[2]:
            o, l = _flash_cpu(qb, kb, vb)                                 # (1, H, M_b, Dh), (1, H, M_b)
            out_b.copy_(o)
            lse_b.copy_(l)
    return out, lse


@_cpu_attention_op.register_fake
def _(q, k, v, cu_seqlens):
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((T, H), dtype=_lse_dtype(q.dtype))  # (T, H, Dh), (T, H)


@torch.library.custom_op("dcdit::packed_attention_backward", mutates_args=(), device_types="cpu")
def _cpu_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor,
                               cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out, q, k, v, out (T, H, Dh), lse (T, H), cu_seqlens (B+1,) -> grads of q, k, v, each (T, H, Dh)."""
    lens = _seqlens(cu_seqlens, q.shape[0])
    grads = [t.new_empty(t.shape) for t in (q, k, v)]                     # 3 x (T, H, Dh)
    inputs = zip(*(_per_sample(t, lens) for t in (grad_out, q, k, v, out, lse)))  # B x ((1, H, M_b, Dh) x5, lse)
    outputs = zip(*(_per_sample(t, lens) for t in grads))                 # B x 3 x (1, H, M_b, Dh)
    for args, grads_b in zip(inputs, outputs):
        if args[0].shape[2]:
            for grad, part in zip(grads_b, _flash_cpu_backward(*args, 0.0, False)):  # 3 x (1, H, M_b, Dh)
                grad.copy_(part)
    return tuple(grads)


@_cpu_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))                # 3 x (T, H, Dh)


def _cpu_attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.mark_non_differentiable(lse)


def _cpu_attention_backward(ctx, grad_out, grad_lse):  # lse is non-differentiable: grad_lse carries nothing
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _cpu_attention_backward_op(grad_out, q, k, v, out, lse, cu_seqlens)  # 3 x (T, H, Dh)
    return dq, dk, dv, None


_cpu_attention_op.register_autograd(_cpu_attention_backward, setup_context=_cpu_attention_setup_context)


def _attention_pairs(cu_seqlens: torch.Tensor) -> int:
    """sum_b M_b^2: the query-key pairs of a packed batch."""
    bounds = cu_seqlens.tolist()
    return sum((e - s) ** 2 for s, e in zip(bounds, bounds[1:]))


# FlopCounterMode sees these operators, not the kernels inside them: without formulas attention counts as 0.
@register_flop_formula(torch.ops.dcdit.packed_attention, get_raw=True)
def _cpu_attention_flops(q, k, v, cu_seqlens, *args, out_val=None, **kwargs) -> int:
    """QK^T and AV of every sample, H sum_b M_b^2 pairs, as FlopCounterMode prices SDPA."""
    return attention_flops(q.shape[1] * _attention_pairs(cu_seqlens), q.shape[2], v.shape[2])


@register_flop_formula(torch.ops.dcdit.packed_attention_backward, get_raw=True)
def _cpu_attention_backward_flops(grad_out, q, k, v, out, lse, cu_seqlens, *args, out_val=None, **kwargs) -> int:
    return attention_backward_flops(attention_flops(q.shape[1] * _attention_pairs(cu_seqlens), q.shape[2], v.shape[2]))


def packed_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """q, k, v (T, H, Dh) on the CPU, cu_seqlens (B+1,) int offsets -> (T, H, Dh), each sample attending only to
    its own tokens (no scale argument: 1/sqrt(Dh), as SDPA's default)."""
    if q.dim() != 3 or not q.shape == k.shape == v.shape:
        raise ValueError(f"packed attention: q, k, v must share one (T, H, Dh) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _CPU_DTYPES or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"packed attention on CPU: q, k, v must share one of {_CPU_DTYPES}, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.device.type != "cpu":
        raise ValueError(f"packed attention on CPU: cu_seqlens must be a 1-D integer CPU tensor, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
    return _cpu_attention_op(q, k, v, cu_seqlens)[0]                      # (T, H, Dh)


def _jagged_attention(q, k, v, layout: TokenLayout) -> torch.Tensor:
    """q, k, v (T, H, Dh) -> (T, H, Dh) through jagged nested tensors and SDPA: the GPU path for dtypes the varlen
    kernels do not take. It runs on the CPU as well (unfused), which is how its offsets are tested."""
    offsets = layout.cu_seqlens.long()                                    # (B+1,) int64, as jagged tensors take
    nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t, offsets, max_seqlen=layout.max_seqlen)
                  .transpose(1, 2) for t in (q, k, v))                    # (B, H, j, Dh) jagged
    out = F.scaled_dot_product_attention(nq, nk, nv)                      # (B, H, j, Dh) jagged
    return out.transpose(1, 2).values()                                   # (T, H, Dh)


# torch.compile runs the jagged path eagerly (one graph break per attention layer): compiled autograd in PyTorch 2.11
# fails on the jagged tensor's gradient in the backward (its tangent carries one metadata field more than the traced
# one), while eager autograd through nested tensors is exact. Only fp32 on a GPU comes here (bf16/fp16 training uses
# the varlen kernels above, which compile), so only a machine with one wraps it (the wrapper imports torch._dynamo).
if torch.cuda.is_available():  # pragma: no cover - depends on the machine
    _jagged_attention = torch.compiler.disable(_jagged_attention)


def _packed_attention(q, k, v, layout: TokenLayout) -> torch.Tensor:
    """q, k, v (T, H, Dh) -> (T, H, Dh), each sample attending only to its own tokens. Every path reads its
    offsets from the layout (TokenLayout.build's cu_seqlens and max_seqlen)."""
    m = layout.max_seqlen
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(q, k, v, layout.cu_seqlens, layout.cu_seqlens, m, m)
        if varlen_attn is not None:
            return varlen_attn(q, k, v, layout.cu_seqlens, layout.cu_seqlens, m, m)
    if not q.is_cuda:
        return packed_attention_cpu(q, k, v, layout.cu_seqlens)           # (T, H, Dh)
    return _jagged_attention(q, k, v, layout)                             # (T, H, Dh)


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
