"""The fast attention and MLP paths against a plain transcription of docs/design.md "Attention".

The model fuses the projections the published layout splits, adds attention outputs straight
into the LePE buffer, chunks large global attention, applies GELU in place, and under autograd
runs the stem channels-last and the MLP's ``h + dwconv(h)`` as one convolution. The references
below compute the same thing layer by layer, one linear at a time, as the published code does;
the fast paths must give the same outputs, significance maps and gradients, also on padded
grids. The accuracy contract (tests/test_contract.py) covers the published outputs themselves.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

import sgformer.model
from sgformer.layers import (
    Linear,
    StackedLinear,
    fused,
    grid_map,
    grid_padding,
    pad_grid,
    valid_mask,
    window_partition,
    window_reverse,
)
from sgformer.model import GlobalAttention, HybridScaleAttention, SelfGuidedAttention
from sgformer.reallocation import combine_significance, key_importance, reallocate_tokens

SIZES = [(224, 224), (97, 131)]  # a grid every window and reduction divides; one padded


def _rows(layer, start, stop):
    """Output rows [start, stop) of a fused linear as the (weight, bias) of a layer alone."""
    return layer.weight[start:stop], layer.bias[start:stop]


def _lepe(attn, x, grid):
    B, N, C = x.shape
    # The LePE linear: the last C output rows of a fused input projection.
    layer = attn.q_lepe if hasattr(attn, "q_lepe") else attn.qkv_lepe
    lepe = F.linear(x, *_rows(layer, layer.out_features - C, layer.out_features))  # B, N, C
    spatial = lepe.transpose(1, 2).reshape(B, C, *grid)  # B, C, H, W
    return attn.lepe_conv(spatial).flatten(2).transpose(1, 2)  # B, N, C


def _hybrid_reference(attn, x, grid, return_parts=False):
    B, N, C = x.shape
    H, W = grid
    d, hg, hl = attn.head_dim, attn.global_heads, attn.local_heads
    # Global heads over the sr-reduced, zero-padded grid.
    sr = attn.sr_ratio
    q = F.linear(x, *_rows(attn.qkv_lepe, 0, hg * d)).reshape(B, N, hg, d).transpose(1, 2)
    pad_h, pad_w = grid_padding(H, W, sr)
    spatial = F.pad(x.transpose(1, 2).reshape(B, C, H, W), (0, pad_w, 0, pad_h))
    reduced = attn.reduce(spatial)  # B, C, Hr, Wr
    Hr, Wr = reduced.shape[-2:]
    reduced = attn.reduce_act(attn.reduce_norm(reduced.flatten(2).transpose(1, 2)))  # B, M, C
    k, v = attn.kv_global(reduced).reshape(B, -1, 2, hg, d).permute(2, 0, 3, 1, 4).unbind(0)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B, hg, N, M
    global_part = key_importance(probs).reshape(B, Hr, Wr)
    global_part = global_part.repeat_interleave(sr, 1).repeat_interleave(sr, 2)[:, :H, :W]
    global_out = (probs @ v).transpose(1, 2).reshape(B, N, hg * d)  # B, N, hg*d
    # Local heads in 7x7 windows of the padded grid, padded keys masked.
    w = attn.window_size
    padding = grid_padding(H, W, w)
    Hp, Wp = H + padding[0], W + padding[1]
    qkv = F.linear(x, *_rows(attn.qkv_lepe, hg * d, (hg + 3 * hl) * d)).reshape(B, H, W, -1)
    windows = window_partition(pad_grid(qkv, padding), w)  # B*nW, w*w, 3*hl*d
    q, k, v = windows.reshape(-1, w * w, 3, hl, d).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # B*nW, hl, w*w, w*w
    real = window_partition(valid_mask(H, W, padding)[None, :, :, None], w).reshape(-1, w * w)
    scores = scores.view(B, -1, hl, w * w, w * w).masked_fill(
        ~real[None, :, None, None, :], float("-inf")
    )
    probs = scores.view(-1, hl, w * w, w * w).softmax(dim=-1)
    local_part = key_importance(probs, real.repeat(B, 1))  # B*nW, w*w
    local_part = window_reverse(local_part.unsqueeze(-1), w, Hp, Wp)[:, :H, :W]
    local_out = (probs @ v).transpose(1, 2).reshape(-1, w * w, hl * d)
    local_out = window_reverse(local_out, w, Hp, Wp)[:, :H, :W].reshape(B, N, hl * d)
    out = attn.proj(torch.cat([global_out, local_out], dim=-1) + _lepe(attn, x, grid))
    parts = (global_part.reshape(B, N), local_part.reshape(B, N))
    return out, combine_significance(*parts, attn.significance), parts if return_parts else None


def _guided_reference(attn, x, grid, significance):
    B, N, C = x.shape
    heads, d, half = attn.num_heads, attn.head_dim, attn.num_heads // 2
    merges = [(m.weight, m.bias) for m in attn.merge]
    merged = reallocate_tokens(x, significance, attn.buckets, merges)
    M = merged.shape[1]
    # The published layer's two projections, one per half of the heads, each keys then values.
    kv_first = [torch.cat([t[: C // 2], t[C : C + C // 2]]) for t in (attn.kv.weight, attn.kv.bias)]
    kv_last = [torch.cat([t[C // 2 : C], t[C + C // 2 :]]) for t in (attn.kv.weight, attn.kv.bias)]
    k_first, v_first = F.linear(merged, *kv_first).reshape(B, M, 2, half, d).permute(2, 0, 3, 1, 4)
    k_last, v_last = F.linear(merged, *kv_last).reshape(B, M, 2, half, d).permute(2, 0, 3, 1, 4)
    q = F.linear(x, *_rows(attn.q_lepe, 0, C)).reshape(B, N, heads, d).transpose(1, 2)
    k, v = torch.cat([k_first, k_last], dim=1), torch.cat([v_first, v_last], dim=1)
    out = F.scaled_dot_product_attention(q, k, v)  # B, heads, N, d
    return attn.proj(out.transpose(1, 2).reshape(B, N, C) + _lepe(attn, x, grid))


def _global_reference(attn, x, grid):
    B, N, C = x.shape
    heads = attn.num_heads
    q = F.linear(x, *_rows(attn.qkv_lepe, 0, C)).reshape(B, N, heads, -1).transpose(1, 2)
    kv = F.linear(x, *_rows(attn.qkv_lepe, C, 3 * C))  # B, N, 2C
    k, v = kv.reshape(B, N, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out + _lepe(attn, x, grid))


def _mlp_reference(mlp, x, grid, tapped_weight=None):  # the stage's sum of the same weights
    B, N, _ = x.shape
    h = mlp.fc1(x)  # B, N, Ch
    h = h + mlp.dwconv(h.transpose(1, 2).reshape(B, -1, *grid)).flatten(2).transpose(1, 2)
    return mlp.fc2(F.gelu(h))


def _reference_model(model, monkeypatch):
    """Route every attention and MLP of ``model``'s classes through the references."""
    monkeypatch.setattr(HybridScaleAttention, "forward", _hybrid_reference)
    monkeypatch.setattr(SelfGuidedAttention, "forward", _guided_reference)
    monkeypatch.setattr(GlobalAttention, "forward", _global_reference)
    monkeypatch.setattr(type(model.stages[0].blocks[0].mlp), "forward", _mlp_reference)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("sgformer_nano").eval()


@pytest.mark.parametrize("size", SIZES)
def test_fast_paths_equal_reference(model, monkeypatch, size) -> None:
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fast = model.forward_intermediates(x)
        fast_maps = model.forward_significance(x)
        _reference_model(model, monkeypatch)
        reference = model.forward_intermediates(x)
        reference_maps = model.forward_significance(x)
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fast[1], reference[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_maps, reference_maps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", SIZES)
def test_fast_paths_give_reference_gradients(monkeypatch, size) -> None:
    # In float64: the fast paths round differently from the references, and in float32 that can
    # swap two nearly tied tokens in a significance sort, which changes the merge gradients far
    # beyond rounding (tests/test_contract.py holds float32 to the published float32 error).
    torch.manual_seed(0)
    model = timm.create_model("sgformer_nano", num_classes=10).train().double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 7])

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        x.grad = None
        F.cross_entropy(model(x), target).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {**grads, "input": x.grad.clone()}

    fast = gradients()
    _reference_model(model, monkeypatch)
    reference = gradients()
    assert fast.keys() == reference.keys()
    assert len(fast) == len(list(model.parameters())) + 1  # every parameter and the input
    for name, grad in reference.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(fast[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_chunked_global_attention_equals_whole(model, monkeypatch) -> None:
    # One layer, not the model: a rounding change in a significance map may swap two tokens
    # of nearly equal score in the next sort, which moves later outputs by more than rounding.
    attn = model.stages[0].blocks[0].attn
    grid = (25, 33)  # a 97 x 131 image: padded for the reduction and the windows
    x = torch.randn(2, grid[0] * grid[1], attn.proj.in_features)
    with torch.no_grad():
        whole, whole_map, whole_parts = attn(x, grid, return_parts=True)
        # A budget of a few rows of scores forces many query chunks.
        monkeypatch.setattr(sgformer.model, "GLOBAL_ATTENTION_CHUNK", 1000)
        chunked, chunked_map, chunked_parts = attn(x, grid, return_parts=True)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip([chunked_map, *chunked_parts], [whole_map, *whole_parts], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_channels_last_stem_equals_the_plain_layers(model) -> None:
    # On the CPU, images from STEM_CHANNELS_LAST_MIN_PIXELS run the stem channels-last (faster):
    # the same values up to rounding as its layers on the NCHW image, with gradients.
    stem = model.stem
    x = torch.randn(2, 3, 161, 175, requires_grad=True)
    tokens, grid = stem(x)
    plain = F.gelu(stem.norm1(stem.conv1(x)))
    plain = stem.norm3(stem.conv3(F.gelu(stem.norm2(stem.conv2(plain)))))  # B, C, H/4, W/4
    assert grid == (41, 44)
    reference = stem.norm(plain.flatten(2).transpose(1, 2))  # B, N, C
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(reference)  # LayerNorm outputs: their squares sum to a constant
    (grad,) = torch.autograd.grad((tokens * weights).sum(), x)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-4 * grad.abs().max())


@pytest.mark.slow
def test_compiled_model_matches_eager_without_graph_breaks(model) -> None:
    x = torch.randn(2, 3, 224, 224)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_dynamic_compile_serves_other_sizes_without_recompiling(model) -> None:
    # The layers take branch-free forms while traced (sizes_are_symbolic), so one graph serves
    # every image size: padded or not, the position table at its own grid or resampled, the
    # last merged run full or short. The eager backend keeps dynamo's tracing with symbolic
    # sizes, where Python branches on sizes become guards, without inductor's code generation
    # (minutes here; benchmarks/dynamic_compile.py measures it, also without recompiling).
    # The first size is not square: otherwise torch assumes H == W (duck sizing) and
    # recompiles at the first non-square input, whatever the model does.
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="eager")
    with torch.no_grad():
        for i, size in enumerate([(160, 128), (224, 224), (264, 200)]):
            x = torch.randn(2 + i % 2, 3, *size)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_grid_map_is_a_channels_last_view_convolutions_keep(batch) -> None:
    # A one-image batch too: with the batch stride C that transpose + reshape gives it, the
    # convolution copied the map to NCHW and returned NCHW, and every later step copied again.
    tokens = torch.randn(batch, 5 * 7, 6)
    spatial = grid_map(tokens, (5, 7))
    assert spatial.data_ptr() == tokens.data_ptr()
    torch.testing.assert_close(spatial, tokens.transpose(1, 2).reshape(batch, 6, 5, 7))
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    assert conv(spatial).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(fused.ONEDNN_LINEAR is None, reason="this torch build has no oneDNN")
def test_linear_runs_on_onednn_only_in_cpu_float32_inference(monkeypatch) -> None:
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    real = fused.ONEDNN_LINEAR
    monkeypatch.setattr(fused, "ONEDNN_LINEAR", spy)
    layer = Linear(64, 32)
    x = torch.randn(2, 49, 64)

    def ran_on_onednn(inputs: torch.Tensor, layer: torch.nn.Linear = layer) -> bool:
        calls.clear()
        out = layer(inputs)
        assert out.shape == (*inputs.shape[:-1], 32)
        if out.dtype == inputs.dtype:  # not under autocast
            expected = F.linear(inputs, layer.weight, layer.bias)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        return bool(calls)

    with torch.no_grad():
        assert ran_on_onednn(x)
        assert ran_on_onednn(x.transpose(0, 1).contiguous().transpose(0, 1))  # strided input
        assert not ran_on_onednn(x.double(), Linear(64, 32, dtype=torch.float64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not ran_on_onednn(x)  # autocast's bfloat16 product, not a float32 one
        with torch.backends.mkldnn.flags(enabled=False):
            assert not ran_on_onednn(x)
    assert not ran_on_onednn(x)  # autograd: oneDNN's linear has no gradient
    with torch.inference_mode():
        assert ran_on_onednn(x)


@pytest.mark.parametrize("biased_parts", [3, 1, 0])
def test_stacked_linear_gradients_are_the_separate_linears(biased_parts) -> None:
    torch.manual_seed(0)
    layer = StackedLinear(8, 3 * 5, 3, biased_parts).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    # gradcheck against finite differences, and against three plain linears
    torch.autograd.gradcheck(lambda x, w: _stacked(layer, w)(x), (x, layer.weight.detach()))
    bias = torch.zeros(15, dtype=torch.float64)
    if biased_parts:  # the unbiased parts first
        bias = F.pad(layer.bias, (15 - layer.bias.shape[0], 0))
    parts = zip(layer.weight.split(5), bias.split(5), strict=True)
    expected = [F.linear(x, w, b) for w, b in parts]
    leading, last = layer(x)
    assert leading.shape == (2, 2, 7, 5) and last.shape == (2, 7, 5)
    # The upstream gradient of the leading parts in another layout, as the attention's window
    # layout returns it.
    upstream = (torch.randn(2, 7, 2, 5).double().movedim(2, 0), torch.randn(2, 7, 5).double())
    grads = torch.autograd.grad([leading, last], [x, *layer.parameters()], upstream)
    reference = torch.autograd.grad(
        [torch.stack(expected[:2]), expected[2]], [x, *layer.parameters()], upstream
    )
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # the inference form: column slices of one product
        leading, last = layer(x)
    torch.testing.assert_close(torch.cat([leading, last[None]]), torch.stack(expected))


@pytest.mark.parametrize("biased_parts", [3, 1, 0])
def test_stacked_linear_on_onednn_gives_the_separate_linears(monkeypatch, biased_parts) -> None:
    calls = []
    real = fused.ONEDNN_LINEAR
    monkeypatch.setattr(fused, "ONEDNN_LINEAR", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(0)
    layer = StackedLinear(8, 3 * 5, 3, biased_parts)
    x = torch.randn(2, 7, 8)
    bias = F.pad(layer.bias, (15 - layer.bias.shape[0], 0)) if biased_parts else None
    expected = F.linear(x, layer.weight, bias).unflatten(-1, (3, 5)).movedim(-2, 0)
    with torch.no_grad():
        leading, last = layer(x)
    assert len(calls) == 2  # the leading parts in one product, the last in another
    assert leading.shape == (2, 2, 7, 5) and last.shape == (2, 7, 5) and last.is_contiguous()
    torch.testing.assert_close(torch.cat([leading, last[None]]), expected)


def test_conv_gelu_fuses_only_in_cpu_inference_in_float32_and_bfloat16(monkeypatch) -> None:
    calls = []
    real = fused.ONEDNN_CONV
    monkeypatch.setattr(fused, "ONEDNN_CONV", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
    x = torch.randn(2, 9, 11, 16).permute(0, 3, 1, 2)  # channels-last, as the model's maps
    weight = conv.weight + 0.5
    expected = F.gelu(F.conv2d(x, weight, conv.bias, padding=1, groups=16))
    with torch.no_grad():
        fused_out = fused.conv2d_gelu(x, weight, conv)
    assert calls == [1]
    torch.testing.assert_close(fused_out, expected, rtol=1e-5, atol=1e-5)
    calls.clear()
    plain = fused.conv2d_gelu(x, weight, conv)  # autograd: the ATen convolution, then GELU
    assert calls == [] and plain.requires_grad
    torch.testing.assert_close(plain, expected, rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_out = fused.conv2d_gelu(x, weight, conv)  # fused in bfloat16, as autocast runs it
        assert calls == [1] and bf16_out.dtype == torch.bfloat16
        unfused = F.gelu(F.conv2d(x, weight, conv.bias, padding=1, groups=16))
    # One rounding to bfloat16 instead of two: at least as close to float32 as autocast's pair.
    fused_error = (bf16_out.float() - expected).abs().max()
    assert fused_error <= (unfused.float() - expected).abs().max()
    torch.testing.assert_close(bf16_out.float(), expected, rtol=2e-2, atol=2e-2)
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):  # not served: ATen
        assert fused.conv2d_gelu(x, weight, conv).dtype == torch.float16 and calls == []


def _stacked(layer, weight):
    """``layer`` as a function of its weight, for gradcheck."""
    return lambda x: torch.func.functional_call(layer, {"weight": weight}, (x,))
