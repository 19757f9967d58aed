"""Significance maps and token reallocation (docs/design.md "Attention").

A hybrid-scale block scores every token by the attention it receives; the self-guided block
after it sorts tokens by that score and merges runs of them, coarsely where the score is low
and finely where it is high. Everything here is a pure function of tensors.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import autocast_dtype, sizes_are_symbolic

SIGNIFICANCE_SOURCES = ("hybrid", "local", "global", "uniform")


@dataclass(frozen=True)
class Bucket:
    """A slice of the ascending significance order and the size of the runs merged in it.

    ``start`` and ``end`` are fractions of N given as (numerator, denominator) so integer
    bounds are exact: ``N * num // den``.
    """

    start: tuple[int, int]
    end: tuple[int, int]
    group_size: int


# docs/design.md "Self-guided attention: buckets and merges", step 2: buckets of the sorted
# order, least significant first, and the published merge sizes (the shapes of the
# checkpoint's f1, f2, f3 weights).
REALLOCATION_BUCKETS: dict[int, tuple[Bucket, ...]] = {
    8: (Bucket((0, 4), (1, 4), 196), Bucket((1, 4), (3, 4), 56), Bucket((3, 4), (4, 4), 28)),
    4: (Bucket((0, 4), (1, 4), 49), Bucket((1, 4), (3, 4), 14), Bucket((3, 4), (4, 4), 7)),
    2: (Bucket((0, 2), (1, 2), 2), Bucket((1, 2), (2, 2), 1)),
}


def buckets_for(sr_ratio: int) -> tuple[Bucket, ...]:
    """The bucket layout of a stage with reduction ratio ``sr_ratio``."""
    if sr_ratio not in REALLOCATION_BUCKETS:
        raise ValueError(
            f"no token reallocation is defined for sr_ratio={sr_ratio}; "
            f"use one of {sorted(REALLOCATION_BUCKETS)} (or 1 for plain global attention)"
        )
    return REALLOCATION_BUCKETS[sr_ratio]


def bucket_bounds(num_tokens: int, buckets: tuple[Bucket, ...]) -> list[tuple[int, int]]:
    """Integer [start, end) of each bucket in a sorted order of ``num_tokens`` tokens."""
    return [
        (num_tokens * b.start[0] // b.start[1], num_tokens * b.end[0] // b.end[1]) for b in buckets
    ]


def merged_token_counts(num_tokens: int, buckets: tuple[Bucket, ...]) -> list[int]:
    """How many merged tokens each bucket yields: ceil(bucket length / group size)."""
    return [
        -(-(end - start) // b.group_size)
        for (start, end), b in zip(bucket_bounds(num_tokens, buckets), buckets, strict=True)
    ]


def significance_dtype(device: torch.device) -> torch.dtype:
    """The dtype significance maps are summed in: float64 wherever the device has it.

    The self-guided sort ranks tokens by these sums, and nearly tied tokens are common. Summed
    in float32, the rounding of the sums decides their order, and a token that lands in another
    merge run changes the outputs far more than rounding does: sgformer_nano's float32 stage
    features then lie 0.8-1.3x as far from the published float64 run as the published float32
    code's own do; summed in float64 (from the same float32 probabilities), 0.3-0.5x
    (tests/test_contract.py). Apple's MPS has no float64 and keeps float32.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def key_importance(attn: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention each key receives, over heads and over (real) queries.

    Args:
        attn: (..., h, Nq, Nk) attention probabilities.
        query_mask: optional bool (..., Nq) (broadcastable), True for real queries; padded
            queries are left out of the mean.

    Returns:
        (..., Nk) in ``significance_dtype``. For softmax rows, each output sums to 1 over its
        keys.
    """
    dtype = significance_dtype(attn.device)
    attn = attn.detach()
    if query_mask is None:
        return attn.mean(dim=(-3, -2), dtype=dtype)
    attn = attn.mean(dim=-3, dtype=dtype)  # ..., Nq, Nk
    weights = query_mask.to(dtype).unsqueeze(-1)  # ..., Nq, 1
    return (attn * weights).sum(dim=-2) / weights.sum(dim=-2)


def combine_significance(
    global_part: torch.Tensor | None, local_part: torch.Tensor | None, source: str
) -> torch.Tensor:
    """The map that guides reallocation, from the parts (B, N) a hybrid block measured.

    ``hybrid`` sums both scales (docs/design.md); ``local``/``global`` keep one (paper Table 6);
    ``uniform`` ignores content: a fixed ramp over raster positions, so the sort keeps raster
    order and every image is reallocated the same way.
    """
    if source == "hybrid":
        return global_part + local_part
    if source == "local":
        return local_part
    if source == "global":
        return global_part
    reference = global_part if global_part is not None else local_part
    B, N = reference.shape
    ramp = torch.arange(N, device=reference.device, dtype=reference.dtype)
    return ramp.expand(B, N)


def significance_order(significance: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) token indices by ascending significance.

    torch's default (unstable) sort, as the published code uses: maps do contain exact ties,
    and the published weights were trained with the order this sort gives them.
    """
    return torch.sort(significance, dim=-1).indices


def merge_runs(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Merge consecutive runs of ``g`` tokens with a learned ``Linear(g, 1)``.

    Args:
        tokens: (B, L, C) one bucket in sorted order.
        weight: (1, g) merge weights, shared over channels.
        bias: (1,).

    Returns:
        (B, ceil(L / g), C). When g does not divide L, the last run holds r = L mod g
        tokens; its g - r missing slots are filled with the mean of its r tokens, so every
        token is merged exactly once and a run of equal tokens merges as a full one would.
    """
    B, L, C = tokens.shape
    g = weight.shape[-1]
    w = weight.reshape(g)
    if sizes_are_symbolic():
        return _merge_runs_branch_free(tokens, w, bias)
    full = L // g
    merged = []
    if full:
        runs = tokens[:, : full * g].reshape(B, full, g, C)  # B, L // g, g, C
        merged.append(_weighted_run_sums(runs, w, bias))  # B, L // g, C
    rest = L - full * g
    if rest:
        tail = tokens[:, full * g :]  # B, r, C
        tail_weight = w[:rest] + w[rest:].sum() / rest  # r
        merged.append((torch.einsum("brc,r->bc", tail, tail_weight) + bias).unsqueeze(1))
    return torch.cat(merged, dim=1) if len(merged) > 1 else merged[0]


def _weighted_run_sums(runs: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, q, g, C) runs, (g,) weights, (1,) bias -> (B, q, C) weighted sums over each run.

    Under autograd, :class:`_RunSums`. Inference takes one linear of the runs' g tokens, bias
    included, or for runs of one token the fused multiply-add.
    """
    device_type = runs.device.type
    autocast_on = autocast_dtype(device_type) is not None
    if autocast_on:
        # Autocast would run these products in bfloat16 or float16; the merge sums in the dtype
        # the tokens and weights promote to, as their broadcast product and sum does.
        dtype = torch.promote_types(runs.dtype, w.dtype)
        runs, w, bias = runs.to(dtype), w.to(dtype), bias.to(dtype)
    with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
        # TorchScript tracing cannot record a Python Function: it takes the plain operators.
        if torch.is_grad_enabled() and not torch.jit.is_tracing():
            return _RunSums.apply(runs, w, bias)  # B, q, C
        if runs.shape[2] == 1:
            return torch.addcmul(bias, runs.squeeze(2), w)  # B, q, C
        by_run = runs.transpose(-1, -2)  # B, q, C, g
        return F.linear(by_run, w[None], bias).squeeze(-1)  # B, q, C


class _RunSums(torch.autograd.Function):
    """Weighted sums of runs, (B, q, g, C) runs, (g,) weights, (1,) bias -> (B, q, C), with a
    backward of four calls for every run length.

    The forward is one batched product with the bias, (1, g) weights by each (g, C) run, or
    a fused multiply-add for runs of one token. Autograd's backward of those takes five and
    four calls, six for the multiply and add it needs a differentiable form of: it reduces
    the broadcast weights and bias in separate sums and copies the incoming gradient (a slice
    of the merged tokens' gradient) into the product's layout. Here the runs' gradient is one
    broadcast product, the weights' a product and a sum, the bias's a sum, each reading the
    gradient as it is laid out.
    """

    @staticmethod
    def forward(runs: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, q, g, C = runs.shape
        if g == 1:
            return torch.addcmul(bias, runs.squeeze(2), w)  # B, q, C
        weights = w.view(1, 1, g).expand(B * q, 1, g)  # B*q, 1, g
        sums = torch.baddbmm(bias.view(1, 1, 1), weights, runs.reshape(B * q, g, C))
        return sums.view(B, q, C)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
        runs, w, _ = inputs
        ctx.save_for_backward(runs, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        runs, w = ctx.saved_tensors
        by_token = grad.unsqueeze(2)  # B, q, 1, C
        grad_runs = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_runs = by_token * w.view(-1, 1)  # B, q, g, C
        if ctx.needs_input_grad[1]:
            grad_w = (runs * by_token).sum((0, 1, 3))  # g
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum().view(1)
        return grad_runs, grad_w, grad_bias


def _merge_runs_branch_free(
    tokens: torch.Tensor, w: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """:func:`merge_runs` without a branch on the bucket length, for traced graphs.

    The bucket is zero-padded to whole runs, and the last run (1 to g real tokens) takes the
    tail weights, which are ``w`` itself when the run is full.

    Args:
        tokens: (B, L, C); w: (g,); bias: (1,).

    Returns:
        (B, ceil(L / g), C).
    """
    B, L, C = tokens.shape
    g = w.shape[0]
    runs = (L + g - 1) // g
    rest = L - (runs - 1) * g  # real tokens in the last run, 1..g
    padded = F.pad(tokens, (0, 0, 0, runs * g - L)).reshape(B, runs, g, C)  # B, runs, g, C
    real = torch.arange(g, device=w.device) < rest  # g
    tail_weight = torch.where(real, w + w.masked_fill(real, 0).sum() / rest, 0)  # g
    last = torch.arange(runs, device=w.device)[:, None] == runs - 1  # runs, 1
    weights = torch.where(last, tail_weight, w)  # runs, g
    return torch.einsum("bqgc,qg->bqc", padded, weights) + bias  # B, runs, C


class _OrderTokens(torch.autograd.Function):
    """Tokens (B, N, C) in the order (B, N) of a permutation of N, by one gather.

    torch's gather scatters its gradient into a zero tensor; a permutation's gradient is the
    gather by the inverse permutation: one (B, N, C) tensor instead of two, same calls.
    """

    @staticmethod
    def forward(tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        return torch.gather(tokens, 1, order.unsqueeze(-1).expand(B, N, C))  # B, N, C

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (order,) = ctx.saved_tensors
        B, N, C = grad.shape
        inverse = torch.argsort(order, dim=-1)  # B, N: each token's place in the order
        return torch.gather(grad, 1, inverse.unsqueeze(-1).expand(B, N, C)), None


def reallocate_tokens(
    tokens: torch.Tensor,
    significance: torch.Tensor,
    buckets: tuple[Bucket, ...],
    merges: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Sort tokens by significance, bucket the order and merge each bucket's runs.

    Args:
        tokens: (B, N, C).
        significance: (B, N); only its order is used (no gradient flows through it).
        buckets: layout from :func:`buckets_for`.
        merges: (weight (1, g), bias (1,)) per bucket.

    Returns:
        (B, M', C) merged tokens, least significant buckets first, with
        M' = sum(merged_token_counts(N, buckets)).
    """
    B, N, C = tokens.shape
    order = significance_order(significance)  # B, N
    # Unlike layers.is_traced, torch.compile keeps this Function: its gradient is a gather by
    # the inverse order, where the plain gather's is a scatter into zeros. TorchScript tracing
    # cannot record a Python Function and takes the plain gather.
    if torch.is_grad_enabled() and tokens.requires_grad and not torch.jit.is_tracing():
        ordered = _OrderTokens.apply(tokens, order)  # B, N, C
    else:
        ordered = torch.gather(tokens, 1, order.unsqueeze(-1).expand(B, N, C))  # B, N, C
    # The buckets tile [0, N) in order, so one split cuts them: under autograd its backward is
    # one `cat` of the buckets' gradients, where a slice per bucket would scatter each into a
    # zero (B, N, C) tensor and then sum those.
    parts = ordered.split([end - start for start, end in bucket_bounds(N, buckets)], dim=1)
    merged = [
        merge_runs(part, weight, bias)
        for part, (weight, bias) in zip(parts, merges, strict=True)
        if sizes_are_symbolic() or part.shape[1] > 0  # traced: inputs of 32 px and more fill all
    ]
    return torch.cat(merged, dim=1)  # B, M', C


def token_allocation(significance: torch.Tensor, buckets: tuple[Bucket, ...]) -> torch.Tensor:
    """The merge group size each token fell into, in raster order.

    Args:
        significance: (B, N).

    Returns:
        (B, N) int64: the group size ``g`` of the token's bucket (large = merged coarsely).
    """
    B, N = significance.shape
    sizes = torch.empty(N, dtype=torch.long, device=significance.device)
    for (start, end), bucket in zip(bucket_bounds(N, buckets), buckets, strict=True):
        sizes[start:end] = bucket.group_size
    order = significance_order(significance)  # B, N
    allocation = torch.empty_like(order)
    allocation.scatter_(1, order, sizes.expand(B, N))  # B, N
    return allocation
