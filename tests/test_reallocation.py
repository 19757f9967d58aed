"""Token reallocation, significance reduction, gradients and the paper's ablations."""

import pytest
import timm
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import sgformer.reallocation
from sgformer.model import HybridScaleAttention, SelfGuidedAttention
from sgformer.reallocation import (
    REALLOCATION_BUCKETS,
    bucket_bounds,
    buckets_for,
    key_importance,
    merge_runs,
    merged_token_counts,
    reallocate_tokens,
    token_allocation,
)


@pytest.mark.parametrize(
    ("sr", "num_tokens", "counts"),
    [
        (8, 3136, [4, 28, 28]),
        (4, 784, [4, 28, 28]),
        (2, 196, [49, 98]),
    ],  # docs/design.md table at 224
)
def test_merged_token_counts_match_spec_at_224(sr: int, num_tokens: int, counts: list) -> None:
    assert merged_token_counts(num_tokens, buckets_for(sr)) == counts


def test_bucket_bounds_cover_every_token_once() -> None:
    for buckets in REALLOCATION_BUCKETS.values():
        for n in (1, 2, 3, 5, 97, 1001):
            bounds = bucket_bounds(n, buckets)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


@pytest.fixture(params=[False, True], ids=["eager", "traced"])
def traced_forms(request, monkeypatch) -> bool:
    """Run a test with the eager forms, and with the branch-free forms traced graphs take."""
    monkeypatch.setattr(sgformer.reallocation, "sizes_are_symbolic", lambda: request.param)
    return request.param


def test_merge_runs_full_and_partial_runs(traced_forms) -> None:
    tokens = torch.arange(7.0).reshape(1, 7, 1)  # two runs of 3, then a run of 1
    weight, bias = torch.tensor([[1.0, 10.0, 100.0]]), torch.tensor([0.5])
    merged = merge_runs(tokens, weight, bias)
    # full runs: w . (0, 1, 2) and w . (3, 4, 5); the lone 6 stands in for all three slots
    expected = torch.tensor([[[210.5], [543.5], [6.0 * 111 + 0.5]]])
    torch.testing.assert_close(merged, expected)
    # a partial run of equal tokens merges exactly as a full run of them would
    same = torch.full((1, 2, 1), 3.0)
    torch.testing.assert_close(
        merge_runs(same, weight, bias), merge_runs(torch.full((1, 3, 1), 3.0), weight, bias)
    )


@pytest.mark.parametrize("group", [1, 2, 7])
def test_merge_runs_under_autograd_gives_the_weighted_sums_and_their_gradients(group) -> None:
    # Training takes other forms than inference (elementwise products and sums); written out
    # run by run, the merge and its gradients must be the same.
    length = 3 * group + (group > 1)  # three full runs, and a short last one where there can be
    tokens = torch.randn(2, length, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, group, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, dtype=torch.float64, requires_grad=True)
    w = weight[0]
    runs = []
    for start in range(0, length, group):
        run = tokens[:, start : start + group]  # B, r, C
        r = run.shape[1]
        run_weight = w[:r] + w[r:].sum() / r  # missing slots take the run's mean
        runs.append((run * run_weight[:, None]).sum(1) + bias)
    expected = torch.stack(runs, dim=1)  # B, runs, C
    merged = merge_runs(tokens, weight, bias)
    torch.testing.assert_close(merged, expected)
    # In the model the merged tokens' gradient arrives as a strided slice of a concatenation's.
    upstream = torch.randn(2, 2 * expected.shape[1], 5, dtype=torch.float64)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return (torch.cat([out, out.detach()], dim=1) * upstream).sum()

    got = torch.autograd.grad(loss(merged), (tokens, weight, bias))
    want = torch.autograd.grad(loss(expected), (tokens, weight, bias))
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e)
    with torch.no_grad():  # the inference form
        torch.testing.assert_close(merge_runs(tokens, weight, bias), expected)


@pytest.mark.parametrize("group", [1, 2, 7, 49])
def test_branch_free_merge_equals_the_branching_one(group, monkeypatch) -> None:
    # Traced graphs pad a bucket to whole runs and weight the last run's missing slots by
    # zero; every bucket length, full runs only or a short last run, merges as in eager mode.
    weight, bias = torch.randn(1, group), torch.randn(1)
    for length in sorted({1, max(group - 1, 1), group, group + 1, 3 * group + 2}):
        tokens = torch.randn(2, length, 5)
        eager = merge_runs(tokens, weight, bias)
        monkeypatch.setattr(sgformer.reallocation, "sizes_are_symbolic", lambda: True)
        traced = merge_runs(tokens, weight, bias)
        monkeypatch.undo()
        assert traced.shape == eager.shape == (2, -(-length // group), 5)
        torch.testing.assert_close(traced, eager)


def test_reallocation_sorts_ascending_and_merges_consecutive_runs() -> None:
    B, N, C = 1, 8, 1
    tokens = torch.arange(N, dtype=torch.float64).reshape(B, N, C) * 10
    significance = torch.tensor([[7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    buckets = buckets_for(2)  # [0, N/2) in runs of 2, [N/2, N) singly
    merges = [
        (torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)),
        (torch.tensor([[1.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)),
    ]
    merged = reallocate_tokens(tokens, significance, buckets, merges)[0, :, 0]
    # ascending order visits tokens 70, 60, ..., 0
    expected = torch.tensor([70 + 2 * 60, 50 + 2 * 40, 30, 20, 10, 0], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)
    allocation = token_allocation(significance, buckets)
    assert allocation.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2]]


def test_key_importance_averages_real_queries_only() -> None:
    attn = torch.softmax(torch.randn(2, 3, 4, 5), dim=-1)  # B, h, Nq, Nk
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    importance = key_importance(attn, mask)
    assert importance.dtype == torch.float64  # significance_dtype: the sort ranks these sums
    torch.testing.assert_close(importance[0], attn[0, :, :2].double().mean(dim=(0, 1)))
    torch.testing.assert_close(importance[1], attn[1].double().mean(dim=(0, 1)))
    torch.testing.assert_close(importance.sum(-1), torch.ones(2, dtype=torch.float64))


def _gradcheck(module: torch.nn.Module, call, inputs: tuple, param_names: list[str]) -> None:
    """gradcheck w.r.t. ``inputs`` and the named parameters; ``call(values, *inputs)`` runs."""
    params = dict(module.named_parameters())
    chosen = tuple(params[name].detach().clone().requires_grad_() for name in param_names)

    def run(*args: torch.Tensor) -> torch.Tensor:
        values = params | dict(zip(param_names, args[len(inputs) :], strict=True))
        return call(values, *args[: len(inputs)])

    assert gradcheck(run, inputs + chosen, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_hybrid_scale_attention_with_padding() -> None:
    torch.manual_seed(0)
    attn = HybridScaleAttention(8, 2, sr_ratio=4, dtype=torch.float64)
    x = torch.randn(1, 9 * 10, 8, dtype=torch.float64, requires_grad=True)  # pads to 12 and 14

    def call(values, x):
        out, significance, parts = functional_call(attn, values, (x, (9, 10)))
        return out

    _gradcheck(attn, call, (x,), ["reduce.weight", "qkv_lepe.weight", "kv_global.weight"])


def test_gradcheck_self_guided_attention_through_sort_and_partial_merge() -> None:
    torch.manual_seed(0)
    attn = SelfGuidedAttention(8, 2, sr_ratio=4, dtype=torch.float64)
    for m in attn.merge:  # published-size merges, but with non-trivial weights
        torch.nn.init.normal_(m.weight, std=0.3)
    x = torch.randn(
        1, 9 * 10, 8, dtype=torch.float64, requires_grad=True
    )  # 90 tokens: partial runs
    significance = torch.randn(1, 90, dtype=torch.float64)

    def call(values, x):
        return functional_call(attn, values, (x, (9, 10), significance))

    _gradcheck(attn, call, (x,), ["merge.0.weight", "merge.2.weight", "kv.weight"])


def nano(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("sgformer_nano", num_classes=0, **kwargs).eval()


def test_significance_source_ablation_changes_the_guide() -> None:
    x = torch.randn(1, 3, 96, 96)
    parts = nano().forward_significance(x, return_parts=True)
    for source, key in (("local", "local"), ("global", "global")):
        model = nano(significance=source)
        ablated = model.forward_significance(x, return_parts=True)
        for a, p in zip(ablated, parts, strict=True):
            torch.testing.assert_close(a["significance"], p[key])
            torch.testing.assert_close(a[key], p[key])
    uniform = nano(significance="uniform")
    first = uniform.forward_significance(x, return_parts=True)[0]
    raster = first["allocation"].flatten()
    assert torch.equal(raster, raster.sort().values.flip(0))  # raster order: coarse first
    assert torch.equal(first["allocation"], uniform.forward_significance(-x, True)[0]["allocation"])
    with torch.no_grad():
        assert not torch.allclose(nano(significance="uniform")(x), nano()(x))


def test_single_scale_attention_ablation() -> None:
    x = torch.randn(1, 3, 96, 96)
    local = nano(attention="local", significance="local")
    block = local.stages[0].blocks[0].attn
    assert block.global_heads == 0 and not hasattr(block, "reduce")
    # queries, keys and values of both heads, then the LePE linear
    assert block.qkv_lepe.out_features == 4 * 32
    maps = local.forward_significance(x, return_parts=True)
    assert all(m["global"] is None and m["local"] is not None for m in maps)
    global_only = nano(attention="global", significance="global")
    block = global_only.stages[0].blocks[0].attn
    assert block.local_heads == 0 and block.kv_global.out_features == 64
    maps = global_only.forward_significance(x, return_parts=True)
    assert all(m["local"] is None for m in maps)
    # the global map is piecewise constant on sr x sr cells: 8 x 8 in stage 1
    first = maps[0]["global"][0]
    torch.testing.assert_close(first[:8, :8], first[0, 0].expand(8, 8))


def test_allocation_counts_equal_bucket_sizes_used() -> None:
    maps = nano().forward_significance(torch.randn(2, 3, 97, 131), return_parts=True)
    for m in maps:
        H, W = m["significance"].shape[1:]
        bounds = bucket_bounds(H * W, buckets_for({0: 8, 1: 4, 2: 2}[m["stage"]]))
        for g, (start, end) in zip(m["group_sizes"], bounds, strict=True):
            assert ((m["allocation"] == g).sum(dim=(1, 2)) == end - start).all()
        assert m["merged_tokens"] == merged_token_counts(H * W, buckets_for(8 >> m["stage"]))
