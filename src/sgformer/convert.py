"""Published checkpoint file -> our weights: read, unwrap, rename, strict load, save."""

import hashlib
import json
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_file

from .checkpoint import read_checkpoint, weights_source
from .model import checkpoint_filter_fn

METADATA_KEY = "sgformer"


def convert_checkpoint(
    src: str | Path, dst: str | Path, model_name: str, **model_kwargs: Any
) -> dict[str, Any]:
    """Convert a published (or our own) checkpoint into a verified ``.safetensors`` file.

    The weights are mapped by ``checkpoint_filter_fn`` and loaded strictly into
    ``model_name`` built with ``model_kwargs``; the file's metadata holds both as JSON under
    ``METADATA_KEY``. Converting the same weights twice gives the same bytes.

    Returns:
        ``{"model", "num_params", "sha256", "path"}``.
    """
    model = timm.create_model(model_name, **model_kwargs)
    state_dict = checkpoint_filter_fn(weights_source(read_checkpoint(src)), model)
    model.load_state_dict(state_dict, strict=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes several in random order, which would make the file
    # (and its sha256) differ between two conversions of the same weights.
    metadata = {METADATA_KEY: json.dumps({"model": model_name, "model_kwargs": model_kwargs})}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(dst)
    digest = hashlib.sha256(dst.read_bytes()).hexdigest()
    num_params = sum(p.numel() for p in model.parameters())
    return {"model": model_name, "num_params": num_params, "sha256": digest, "path": str(dst)}
