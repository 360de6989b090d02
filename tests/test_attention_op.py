"""The CPU packed attention operator (dcdit::packed_attention): per-sample SDPA numbers and gradients, its
registrations (opcheck, FLOP count), and torch.compile keeping it inside the graph of a DC-DiT; the layout
offsets every packed path reads (CPU operator and GPU kernels alike), and the jagged GPU path run on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from models.attention import (TokenLayout, _cpu_attention_backward_op, _cpu_attention_op, _jagged_attention,
                              packed_attention_cpu)
from conftest import trained_tiny_dcdit
from models.flops import flop_counter

LENS = [5, 1, 9, 0, 3]  # unequal, with a single-token sample and an empty one


def offsets(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # (B+1,)


def packed_qkv(lens, heads=2, head_dim=4, dtype=torch.float32, seed=0):
    """(T, 3, H, Dh) leaf and its q, k, v strided views (T, H, Dh), laid out as Attention.forward makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lens), 3, heads, head_dim, generator=g).to(dtype).requires_grad_()
    return qkv, qkv.unbind(1)


def reference(q, k, v, lens):
    """Each sample's tokens through F.scaled_dot_product_attention on their own: (T, H, Dh)."""
    outs = [F.scaled_dot_product_attention(a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1)).transpose(0, 1)
            for a, b, c in zip(q.split(lens), k.split(lens), v.split(lens))]  # each (M_b, H, Dh)
    return torch.cat(outs)                                                    # (T, H, Dh)


def test_op_matches_per_sample_sdpa_with_grads():
    qkv, (q, k, v) = packed_qkv(LENS)
    ref_qkv, (rq, rk, rv) = packed_qkv(LENS)
    grad = torch.randn(sum(LENS), 2, 4, generator=torch.Generator().manual_seed(1))  # (T, H, Dh)
    out = packed_attention_cpu(q, k, v, offsets(LENS))
    ref = reference(rq, rk, rv, LENS)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qkv.grad, ref_qkv.grad, rtol=1e-5, atol=1e-6)  # q, k and v grads at once
    # A single-token sample attends to itself only: its output is its own value.
    torch.testing.assert_close(out[5], v[5])


def test_inputs_and_grads_of_any_strides():
    """The kernel needs unit-stride rows of Dh: a transposed q/k/v, and the expanded (stride 0) gradient of
    a sum, are copied first rather than read wrong."""
    leaf = torch.randn(sum(LENS), 4, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    ref_leaf = leaf.detach().clone().requires_grad_()
    x, rx = leaf.transpose(1, 2), ref_leaf.transpose(1, 2)                     # (T, H, Dh), last stride H
    out = packed_attention_cpu(x, x * 2, x * 3, offsets(LENS))
    ref = reference(rx, rx * 2, rx * 3, LENS)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    _, (q, k, v) = packed_qkv([3, 1, 4], dtype=torch.float64)
    cu = offsets([3, 1, 4])
    assert torch.autograd.gradcheck(lambda a, b, c: packed_attention_cpu(a, b, c, cu), (q, k, v))


def test_bfloat16_close_to_float32():
    qkv, (q, k, v) = packed_qkv(LENS, dtype=torch.bfloat16)
    out = packed_attention_cpu(q, k, v, offsets(LENS))
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and qkv.grad.dtype == torch.bfloat16
    ref = reference(*(t.detach().float() for t in (q, k, v)), LENS)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_bad_inputs_are_named():
    _, (q, k, v) = packed_qkv(LENS)
    with pytest.raises(TypeError, match="must share one of"):
        packed_attention_cpu(q.int(), k.int(), v.int(), offsets(LENS))
    with pytest.raises(ValueError, match="share one"):
        packed_attention_cpu(q, k[:-1], v, offsets(LENS))
    with pytest.raises(ValueError, match="1-D integer CPU tensor"):
        packed_attention_cpu(q, k, v, offsets(LENS).float())
    with pytest.raises(ValueError, match="rise from 0 to T=18"):
        packed_attention_cpu(q, k, v, offsets([5, 1, 9, 0, 2]))
    with pytest.raises(ValueError, match="rise from 0 to T=18"):
        packed_attention_cpu(q, k, v, torch.tensor([0, 9, 6, 18], dtype=torch.int32))


def test_opcheck_forward_and_backward_operators():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch with dynamic shapes."""
    _, (q, k, v) = packed_qkv(LENS)
    cu = offsets(LENS)
    torch.library.opcheck(_cpu_attention_op, (q, k, v, cu))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = _cpu_attention_op(q, k, v, cu)
    torch.library.opcheck(_cpu_attention_backward_op, (torch.randn_like(out), q, k, v, out, lse, cu))


def test_flop_counter_prices_the_operator_as_per_sample_sdpa():
    """FlopCounterMode sees the operator, not the kernels inside it: its formulas must give SDPA's counts."""
    _, (q, k, v) = packed_qkv(LENS)
    _, (rq, rk, rv) = packed_qkv(LENS)
    with flop_counter() as ours:
        packed_attention_cpu(q, k, v, offsets(LENS)).sum().backward()
    with flop_counter() as per_sample:
        reference(rq, rk, rv, LENS).sum().backward()
    assert ours.get_total_flops() == per_sample.get_total_flops() == 3 * 2 * 2 * sum(m * m for m in LENS) * (4 + 4)


def test_layout_offsets_are_the_varlen_convention():
    """Lengths 3, 1, 4 in a (3, 4) mask: cu_seqlens [0, 3, 4, 8] in int32 (flash-attn's type; the CPU operator,
    flash-attn, PyTorch's varlen_attn and the jagged path all read these offsets), max_seqlen 4, tokens packed
    sample by sample in slot order, and each sample's vector repeated once per token of its own."""
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    z = torch.arange(12.0).view(3, 4, 1)                                      # slot s of sample b holds 4 b + s
    v = torch.tensor([[10.0], [20.0], [30.0]])                                # (B, 1) per-sample vectors
    for seqlens in (None, [3, 1, 4]):                                         # read from the mask, or given
        layout = TokenLayout.build(valid, True, seqlens)
        assert layout.cu_seqlens.dtype == torch.int32 and layout.cu_seqlens.tolist() == [0, 3, 4, 8]
        assert layout.max_seqlen == 4
        assert layout.batch_idx.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
        assert layout.flat_idx.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
        assert layout.pack(z).flatten().tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
        assert layout.unpack(layout.pack(z))[..., 0].tolist() == [[0, 1, 2, 0], [4, 0, 0, 0], [8, 9, 10, 11]]
        assert layout.per_token(v).flatten().tolist() == [10, 10, 10, 20, 30, 30, 30, 30]
    padded = TokenLayout.build(valid, False)
    assert padded.cu_seqlens.dtype == torch.int32 and padded.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert padded.max_seqlen == 4 and padded.pack(z) is z and padded.unpack(z) is z
    assert padded.per_token(v).tolist() == [[[10.0]], [[20.0]], [[30.0]]]   # (B, 1, K) broadcasts over slots


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's prototype notice
@torch.no_grad()
def test_jagged_path_attends_within_each_sample():
    """The GPU path for dtypes without a varlen kernel (jagged nested SDPA), run on the CPU: with lengths
    3, 1, 4 it equals each sample's own SDPA, so its offsets cut the tokens where cu_seqlens says."""
    lens = [3, 1, 4]
    layout = TokenLayout.build(torch.arange(4) < torch.tensor(lens)[:, None], True)  # (3, 4) real slots first
    _, qkv = packed_qkv(lens)
    q, k, v = (t.detach().contiguous() for t in qkv)                          # the GPU branch gets contiguous q/k/v
    out = _jagged_attention(q, k, v, layout)                                  # (T, H, Dh)
    torch.testing.assert_close(out, reference(q, k, v, lens), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[3], v[3])                                  # the 1-token sample sees itself only
    torch.testing.assert_close(packed_attention_cpu(q, k, v, layout.cu_seqlens), out, rtol=1e-5, atol=1e-6)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 500, 900]), torch.tensor([1, 2, 3])


def test_compile_breaks_only_at_the_chunk_host_sync():
    """The attention does not break the graph: every break left is the one host sync of DCDiT.chunk (the kept
    counts as a list), which explain counts once per frame it interrupts (DCDiT.forward, then DCDiT.chunk)."""
    model = trained_tiny_dcdit()
    _, info = model(*inputs(), return_info=True)
    assert len(set(info.kept.tolist())) > 1                                   # unequal lengths reach the op
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(*inputs())
    torch._dynamo.reset()
    innermost = [r.user_stack[-1] for r in ex.break_reasons]
    assert innermost and all(f.filename.endswith("dc_dit.py") and "tolist" in f.line for f in innermost), \
        [f"{f.filename}:{f.lineno} {f.line}" for f in innermost]
    assert ex.graph_count == ex.graph_break_count + 1 <= 4


def test_compiled_training_step_matches_eager():
    """forward + backward through torch.compile(dynamic=True): the operator's fakes and autograd registration
    inside an AOT-autograd graph (the aot_eager backend; Inductor adds ~90 s of C++ compilation here and gave
    the same numbers), then a second batch with other lengths through the same compiled model."""
    model = trained_tiny_dcdit()
    compiled = torch.compile(model, dynamic=True, backend="aot_eager")

    def step(net, batch):
        model.zero_grad(set_to_none=True)
        out = net(*batch)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    try:
        for seed in (0, 1):
            batch = inputs(seed)
            out, grads = step(model, batch)
            c_out, c_grads = step(compiled, batch)
            torch.testing.assert_close(c_out, out, rtol=1e-5, atol=1e-5)
            assert c_grads.keys() == grads.keys()
            for name, grad in grads.items():
                torch.testing.assert_close(c_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        torch._dynamo.reset()
