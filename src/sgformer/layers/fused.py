"""Fast forms of common operations: dropout only where it drops, in-place sums and GELU, and
when the traced forms (``sizes_are_symbolic``) apply; linears, and convolutions with their
GELU, on oneDNN in CPU float32 inference; projections of one input as one product."""

import torch
import torch.nn.functional as F
from torch import nn


def dropout_or_identity(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` for p = 0: a dropout of rate 0 still costs a call
    per use (92 of them in an sgformer_s forward), and the published rates are all 0."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs ``device_type``'s products in, or None when it is off (or the
    device has no autocast at all, as ``meta``)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def sizes_are_symbolic() -> bool:
    """Whether torch.compile or torch.export is tracing the model.

    Sizes may then be symbols: a Python branch on one (is there padding, does the last run of
    merged tokens fall short) would tie the graph to the sizes that take the same branches, so
    layers take branch-free forms. Those compute the same values (padding by zero rows, a mask
    that keeps everything, a short run as a full one with zero weights) and may round
    differently in the last bits, as any compiled kernel may.
    """
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def is_traced() -> bool:
    """Whether torch.compile, torch.export or TorchScript is tracing the model: traced graphs
    keep to ATen operators (no oneDNN-only kernels, no Python autograd Functions)."""
    return sizes_are_symbolic() or torch.jit.is_tracing() or torch.jit.is_scripting()


def add_into(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``buffer + value``, written into ``buffer`` when autograd is not recording.

    In inference the sum then needs no new buffer. Under autograd it is computed out of place:
    an in-place update of a view (a linear's 3-D output and a channels-last convolution's token
    view are views) makes the backward pass copy the whole gradient of the view's base.
    """
    if torch.is_grad_enabled():
        return buffer + value
    return buffer.add_(value)


def scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``a @ (b * scale)`` for (n, i, k) and (n, k, j) batches, e.g. attention scores with the
    softmax scale on the keys.

    In inference it is one call, the scale being the product's ``alpha``; under autograd the
    scale stays a separate product, whose backward is one multiply where ``alpha``'s is two.
    """
    if torch.is_grad_enabled():
        return torch.bmm(a, b * scale)
    # With beta = 0 the added tensor is ignored; a one-element view of `a` serves as it.
    return torch.baddbmm(a[:1, :1, :1], a, b, beta=0, alpha=scale)


# oneDNN's linear and convolution with fused pointwise ops (the kernels torch.compile's CPU
# backend uses), when this build has them.
ONEDNN_LINEAR, ONEDNN_CONV = (
    (
        getattr(torch.ops.mkldnn, "_linear_pointwise", None),
        getattr(torch.ops.mkldnn, "_convolution_pointwise", None),
    )
    if torch.backends.mkldnn.is_available()
    else (None, None)
)


def onednn_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` and ``conv2d_gelu`` run on oneDNN: CPU float32 eager inference
    with oneDNN on.

    There, oneDNN's linear is 1.1-1.5x faster than the BLAS product behind ``F.linear`` for the
    model's shapes (2 threads, docs/BENCHMARKS.md "CPU"), and a convolution computes GELU as it
    writes its output instead of in a pass of its own. Neither has a gradient, an autocast rule
    nor an export or TorchScript form, so training, autocast, float64, tracing and every other
    device keep ``F.linear`` and ``F.conv2d``. Their float32 rounding differs in the last bits,
    which the accuracy contract allows (tests/test_contract.py holds it to the float64
    reference).
    """
    return (
        _eager_cpu_inference(x)
        and ONEDNN_LINEAR is not None
        and ONEDNN_CONV is not None
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and autocast_dtype("cpu") is None
    )


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` meets a oneDNN-only kernel at all: untraced CPU inference with oneDNN on
    (the kernels have no gradient and no export or TorchScript form)."""
    # Tracing first: compile and export must not reach the checks they cannot trace.
    return (
        not is_traced()
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.enabled
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, on oneDNN where ``onednn_serves``."""
    if onednn_serves(x, weight):
        return ONEDNN_LINEAR(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _onednn_conv_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype :func:`conv2d_gelu` runs in on oneDNN, or None for the ATen path: float32
    where ``onednn_serves``, and bfloat16 in CPU inference under bfloat16 autocast (the dtype
    autocast runs the convolution in; GELU on a bfloat16 map is a slow pass of its own there:
    stage-1 MLP at batch 16, convolution and GELU 14.7 -> 10.1 ms fused)."""
    if onednn_serves(x, weight):
        return torch.float32
    bfloat16_inference = (
        _eager_cpu_inference(x)
        and ONEDNN_CONV is not None
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == torch.float32
        and autocast_dtype("cpu") == torch.bfloat16
    )
    return torch.bfloat16 if bfloat16_inference else None


def conv2d_gelu(x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``GELU(conv(x))`` (erf form) with ``weight`` in place of ``conv.weight``: one oneDNN
    call with GELU as its post-op in CPU inference (float32, or bfloat16 autocast), else the
    convolution, then GELU. Fused, GELU reads the float32 accumulator, so under bfloat16 the
    output is rounded once instead of twice."""
    dtype = _onednn_conv_dtype(x, weight)
    if dtype is not None:
        bias = None if conv.bias is None else conv.bias.to(dtype)
        return ONEDNN_CONV(
            x.to(dtype), weight.to(dtype), bias, conv.padding, conv.stride, conv.dilation,
            conv.groups, "gelu", [], "none",
        )  # fmt: skip
    out = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return gelu(out)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Erf GELU that overwrites ``x`` when autograd is not recording.

    Its inputs here are fresh buffers nothing else reads (a norm's or a convolution's output),
    so in inference the activation needs no buffer of its own. The in-place kernel is the
    same vectorised erf GELU, so the values are bit-identical.
    """
    return F.gelu(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x)


class GELU(nn.GELU):
    """``nn.GELU`` (erf form) computed by :func:`gelu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)


class _StackedProduct(torch.autograd.Function):
    """One linear of (M, C_in) rows handed on as its (P-1, M, C) leading parts and its (M, C)
    last part, views of the one (M, P*C) output; its backward gathers the parts' gradients
    into that layout with one ``cat``.

    Autograd's split and reshape of the output would first copy the leading parts' gradient,
    which the attention layouts return part by part, into their joint (M, (P-1)*C) layout, and
    then ``cat`` it with the last part's: two passes over the gradient where one does.
    """

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, C_in), weight (P*C, C_in), bias (P*C,) or None -> (P-1, M, C), (M, C)."""
        out = F.linear(x, weight, bias).view(x.shape[0], parts, -1)  # M, P, C
        return out[:, :-1].transpose(0, 1), out[:, -1]

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.biased = bias is not None

    @staticmethod
    def backward(ctx, grad_head: torch.Tensor, grad_last: torch.Tensor) -> tuple:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        grad = torch.cat([*grad_head.unbind(0), grad_last], dim=-1)  # M, P*C
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None  # M, C_in
        grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None  # P*C, C_in
        grad_bias = grad.sum(0) if ctx.biased and ctx.needs_input_grad[2] else None  # P*C
        return grad_x, grad_weight, grad_bias, None


class StackedLinear(nn.Linear):
    """Several projections of one input, held as one linear whose ``parts`` equal row blocks
    are the projections, and computed as one product whose column blocks are the parts.

    The leading parts feed layers that read them through a copy or a strided view anyway (the
    attention's head and window layouts); the last, the LePE linear, feeds a convolution, which
    compacts it. Under autograd the one product's backward is one product per operand, after
    one ``cat`` of the parts' gradients. (A batched product of the input broadcast over the
    parts gives each part contiguous, but shares an odd number of parts unevenly between
    threads: a training step of a 3-part stage-3 projection at batch 8 took 1.38x as long on 2
    threads.) Where ``onednn_serves`` (CPU float32 inference) the leading parts are one oneDNN
    product and the last part another, so that the convolution reads it as written.

    ``biased_parts`` trailing parts have a bias (all by default), so a layer of projections
    without bias can be fused with one that has one: ``bias`` then holds only theirs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        parts: int,
        biased_parts: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        biased_parts = parts if biased_parts is None else biased_parts
        assert out_features % parts == 0, f"{out_features} outputs in {parts} equal parts"
        assert 0 <= biased_parts <= parts, f"{biased_parts} biased parts of {parts}"
        super().__init__(in_features, out_features, biased_parts > 0, device=device, dtype=dtype)
        self.parts = parts
        if 0 < biased_parts < parts:
            width = out_features // parts * biased_parts
            self.bias = nn.Parameter(torch.empty(width, device=device, dtype=dtype))
            self.reset_parameters()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., C_in) -> ((parts - 1, ..., C) leading parts, (..., C) last part), with
        C = C_out / parts; both may be strided views."""
        weight, bias = self.weight, self.bias
        if bias is not None and bias.shape[0] < self.out_features:
            bias = F.pad(bias, (self.out_features - bias.shape[0], 0))  # zeros: unbiased parts
        if onednn_serves(x, weight):
            split = (self.parts - 1) * self.out_features // self.parts
            x = x.contiguous()
            head_bias, last_bias = (None, None) if bias is None else (bias[:split], bias[split:])
            head = ONEDNN_LINEAR(x, weight[:split], head_bias, "none", [], "")
            last = ONEDNN_LINEAR(x, weight[split:], last_bias, "none", [], "")
            return head.unflatten(-1, (self.parts - 1, -1)).movedim(-2, 0), last
        cast = autocast_dtype(x.device.type)
        if cast is not None:  # the Function's backward runs without autocast
            x, weight = x.to(cast), weight.to(cast)
            bias = None if bias is None else bias.to(cast)
        *lead, c_in = x.shape
        rows = x.reshape(-1, c_in)  # M, C_in
        if torch.is_grad_enabled() and not is_traced():
            head, last = _StackedProduct.apply(rows, weight, bias, self.parts)
        else:  # no backward to shape; traced graphs keep to plain operators
            head, last = _StackedProduct.forward(rows, weight, bias, self.parts)
        return head.unflatten(1, lead), last.unflatten(0, lead)  # P-1, ..., C; ..., C
