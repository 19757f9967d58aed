"""Model summary: parameters and GMACs per stage, and stage output shapes at given sizes."""

import timm
import torch

from .benchmark import count_macs


def model_summary(
    model_name: str = "sgformer_s",
    sizes: tuple[tuple[int, int], ...] = ((224, 224), (800, 1333)),
) -> str:
    """A plain-text table of a model's cost and stage shapes; the first size is used for MACs."""
    model = timm.create_model(model_name).eval()
    params = {
        "stem": sum(
            p.numel() for n, p in model.named_parameters() if n.startswith(("stem", "pos"))
        ),
        "head": sum(p.numel() for n, p in model.named_parameters() if n.startswith("head")),
    }
    for i, stage in enumerate(model.stages):
        params[f"stages.{i}"] = sum(p.numel() for p in stage.parameters())
    height, width = sizes[0]
    macs = count_macs(model, torch.zeros(1, 3, height, width))
    lines = [
        f"{model_name}: {sum(params.values()):,} parameters, "
        f"{macs['total'] / 1e9:.2f} GMACs at {height} x {width}",
        f"{'part':<10}{'params':>14}{'GMACs':>10}",
    ]
    for part, count in params.items():
        lines.append(f"{part:<10}{count:>14,}{macs['by_module'].get(part, 0) / 1e9:>10.3f}")
    for height, width in sizes:
        with torch.no_grad():
            maps = model.forward_intermediates(
                torch.zeros(1, 3, height, width), intermediates_only=True
            )
        shapes = ", ".join(f"stage {i + 1} {tuple(m.shape[1:])}" for i, m in enumerate(maps))
        lines.append(f"input {height} x {width}: {shapes}")
    return "\n".join(lines)
