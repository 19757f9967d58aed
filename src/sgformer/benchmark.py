"""Cost of a model: multiply-accumulates, counted as fvcore counts them for the paper tables."""

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# fvcore charges an affine LayerNorm/GroupNorm 5 operations per input element; the published
# GMACs (SPEC "Variants") include them, so we do too.
NORM_MACS_PER_ELEMENT = 5


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# flop_counter has no formula for the CPU kernel that scaled_dot_product_attention runs.
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops
}


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Multiply-accumulates of one forward pass of ``model`` on ``x``.

    Matrix products, convolutions and attention come from ``torch.utils.flop_counter``
    (FLOPs halved); LayerNorm/GroupNorm add ``NORM_MACS_PER_ELEMENT`` per input element.

    Returns:
        ``{"total": int, "by_module": {name: int}}`` with the first two levels of module
        names (e.g. ``stem``, ``stages.0``, ``head``).
    """
    norm_macs: dict[str, int] = defaultdict(int)
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):

            def hook(_module: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
                norm_macs[name] += args[0].numel() * NORM_MACS_PER_ELEMENT

            hooks.append(module.register_forward_hook(hook))
    try:
        with FlopCounterMode(display=False, depth=3, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(x)
    finally:
        for handle in hooks:
            handle.remove()

    by_module: dict[str, int] = defaultdict(int)
    root = type(model).__name__
    for name, ops in counter.get_flop_counts().items():
        parts = name.split(".")
        if parts[0] != root or len(parts) < 2:
            continue
        key = ".".join(parts[1:3]) if parts[1] == "stages" else parts[1]
        if len(parts) == 2 or parts[1] == "stages" and len(parts) == 3:
            by_module[key] += sum(ops.values()) // 2
    for name, macs in norm_macs.items():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "stages" else parts[0]
        by_module[key] += macs
    total = counter.get_total_flops() // 2 + sum(norm_macs.values())
    return {"total": total, "by_module": dict(by_module)}
