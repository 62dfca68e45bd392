"""Build the anomalib models compared by the pipeline, from ``params.yaml`` only.

One factory, :func:`build_model`, so that ``train`` and ``evaluate`` construct *exactly* the same
module (same layers, same pre-/post-processing, same metrics) and a checkpoint written by one loads
into the other. Every model uses the ImageNet backbone of ``params.yaml: backbone`` (default
``tf_efficientnet_lite0``, offline; see :mod:`experiments.backbones`), and a pre-processor that
resizes to ``data.image_size`` and normalises with the statistics the backbone's weights were
trained with (``backbone.normalize``), which anomalib bakes into the ONNX
export. Images reach it already at that size (``core.preprocess.fit_image`` in ``prepare``,
serving, evaluate and promote), so that resize is an identity and the resize policy is ours.

Six models: PaDiM, PatchCore, DFM (fitted statistics, one pass), STFPM (student-teacher), and two
trained ones that are stronger on the literature's benchmarks and export cleanly to ONNX:
FRE (a tied autoencoder trained on backbone features; the reconstruction error is the anomaly map)
and SuperSimpleNet (a segmentation head trained against synthetic Perlin-noise anomalies in
feature space; no anomaly images needed). CFlow was tried and dropped: anomalib normalises its
anomaly map by the maximum over the *batch*, so with batch 1 (serving) every image scores ~1
(image AUROC 0.5 in the e2e run).
FastFlow, Reverse Distillation and U-Flow were left out: anomalib hard-codes their backbones to
ResNet/CaiT variants whose ImageNet weights cannot be had offline here.

One table, :data:`MODELS`: each row is a model's params section (a typed class), its anomalib
class and the checks its params need against the backbone. It drives the validation of
``models.<name>``, :func:`build_model`, and the per-model parts of dvc.yaml (``tools.dvc_yaml``),
so a new model is one row plus its section in params.yaml.

Parameters are validated here, before anything heavy is imported, because anomalib's own checks
are either late (after the backbone is built) or silent: an unknown layer name is dropped with a
warning and training carries on with fewer layers. A typo in ``params.yaml`` must fail loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import PlainValidator

from config.params import (
    Params,
    ParamsError,
    Section,
    as_params,
    choice,
    integer,
    invalid,
    names,
    number,
    param_error,
    parse,
)
from experiments.backbones import BackboneError, BackboneSpec, feature_layers, resolve_backbone
from experiments.runtime import seed_everything

if TYPE_CHECKING:  # keep `import experiments.models` cheap: torch/anomalib load only when building
    from anomalib.models import AnomalibModule

DFM_SCORE_TYPES = ("fre", "nll")
SSN_MIN_MAP = 32  # anomalib's Perlin generator draws scales up to 2**5
LayerTable = Mapping[str, tuple[int, int]]  # feature layer -> (channels, stride), in network order


def _single_layer(value: Any) -> str:
    """One layer name (a one-item list is accepted: it is what ``layers`` would say)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        raise invalid("a single layer name")
    return value


# ------------------------------------------------------------------ each model's params section
class ModelSettings(Section):
    """What every ``models.<name>`` section may hold; ``max_epochs`` is read by train."""

    max_epochs: Annotated[int, integer(ge=1)] = 1


class PadimSettings(ModelSettings):
    layers: Annotated[tuple[str, ...], names()]
    n_features: Annotated[int, integer(ge=1)]  # random channel subset; <= channels of the layers


class PatchcoreSettings(ModelSettings):
    layers: Annotated[tuple[str, ...], names()]
    coreset_sampling_ratio: Annotated[float, number(gt=0, le=1)]
    num_neighbors: Annotated[int, integer(ge=1)]


class StfpmSettings(ModelSettings):
    layers: Annotated[tuple[str, ...], names()]


class DfmSettings(ModelSettings):
    layer: Annotated[str, PlainValidator(_single_layer)]
    score_type: Annotated[str, choice(DFM_SCORE_TYPES)] = "fre"
    pooling_kernel_size: Annotated[int, integer(ge=1)]
    pca_level: Annotated[float, number(gt=0, le=1)]


class FreSettings(ModelSettings):
    layer: Annotated[str, PlainValidator(_single_layer)]
    pooling_kernel_size: Annotated[int, integer(ge=1)] = 2
    latent_dim: Annotated[int, integer(ge=1)] = 220


class SupersimplenetSettings(ModelSettings):
    layers: Annotated[tuple[str, ...], names()]
    perlin_threshold: Annotated[float, number(gt=0, le=1)] = 0.2


# -------------------------------------------------- checks against the backbone, derived arguments
def _no_extra(name: str, cfg: Any, layers: LayerTable, size: int) -> dict[str, Any]:
    return {}


def _padim_channels(name: str, cfg: PadimSettings, layers: LayerTable, size: int) -> dict[str, Any]:
    channels = sum(layers[la][0] for la in cfg.layers)
    if cfg.n_features > channels:
        raise ParamsError(
            f"params.yaml: models.{name}.n_features: {cfg.n_features} is larger than the {channels} channels "
            f"of layers {list(cfg.layers)} ({', '.join(f'{la}: {layers[la][0]}' for la in cfg.layers)})"
        )
    return {}


def _fre_input_dim(name: str, cfg: FreSettings, layers: LayerTable, size: int) -> dict[str, Any]:
    channels, stride = layers[cfg.layer]
    side = size // stride // cfg.pooling_kernel_size
    if side < 1:
        raise ParamsError(
            f"params.yaml: models.{name}.pooling_kernel_size: {cfg.pooling_kernel_size} leaves no feature "
            f"map ({cfg.layer} is {size // stride}x{size // stride} at data.image_size {size})"
        )
    # FRE's autoencoder works on the flattened pooled map, so its input size follows the params.
    return {"input_dim": channels * side * side}


def _ssn_map_size(name: str, cfg: SupersimplenetSettings, layers: LayerTable, size: int) -> dict[str, Any]:
    # Features are upscaled to 2x the first layer's map and anomalib draws Perlin noise on it
    # at random scales up to 32: a smaller map crashes training at random (empty noise grid).
    side = 2 * size // layers[cfg.layers[0]][1]
    if side < SSN_MIN_MAP:
        raise ParamsError(
            f"params.yaml: models.{name}.layers: {cfg.layers[0]} gives a {side}x{side} feature map at "
            f"data.image_size {size}; SuperSimpleNet needs >= {SSN_MIN_MAP} (use an earlier "
            f"layer, stride <= {2 * size // SSN_MIN_MAP}, or a larger image_size)"
        )
    return {}


# ------------------------------------------------------------------ classes, imported when building
# Functions, not module-level imports: validating params must not import torch. They are real
# imports (not strings) so that the DVC deps of the stages that build models see them.
def _padim() -> type:
    from anomalib.models import Padim

    return Padim


def _patchcore() -> type:
    from experiments.coreset import FastCoresetPatchcore  # anomalib's, coreset selection ~4x faster

    return FastCoresetPatchcore


def _stfpm() -> type:
    from anomalib.models import Stfpm

    return Stfpm


def _dfm() -> type:
    from anomalib.models import Dfm

    return Dfm


def _fre() -> type:
    from anomalib.models import Fre

    return Fre


def _supersimplenet() -> type:
    from anomalib.models import Supersimplenet

    return Supersimplenet


# --------------------------------------------------------------------------------- the model table
@dataclass(frozen=True)
class ModelSpec:
    """One row of the model table: its params section, its class, and what the backbone must allow.

    A new model is one row here plus its section under ``models`` in params.yaml; the params
    validation and the DVC stages (``python -m tools.dvc_yaml`` writes dvc.yaml) follow from it.
    """

    settings: type[ModelSettings]
    model_class: Callable[[], type]  # returns the anomalib class (imports it)
    check: Callable[[str, Any, LayerTable, int], dict[str, Any]] = _no_extra
    pre_trained: bool = True  # False: the class fixes it (STFPM's teacher, SuperSimpleNet's extractor)


MODELS: dict[str, ModelSpec] = {
    "padim": ModelSpec(PadimSettings, _padim, _padim_channels),
    "patchcore": ModelSpec(PatchcoreSettings, _patchcore),
    "stfpm": ModelSpec(StfpmSettings, _stfpm, pre_trained=False),
    "dfm": ModelSpec(DfmSettings, _dfm),
    "fre": ModelSpec(FreSettings, _fre, _fre_input_dim),
    "supersimplenet": ModelSpec(SupersimplenetSettings, _supersimplenet, _ssn_map_size, pre_trained=False),
}
SUPPORTED_MODELS = tuple(MODELS)


def backbone_spec(params: Params | Mapping[str, Any]) -> BackboneSpec:
    """``params.yaml: backbone`` resolved (weights source checked), as a :class:`ParamsError`."""
    try:
        return resolve_backbone(params)
    except BackboneError as exc:
        raise ParamsError(str(exc)) from exc


def _check_layers(name: str, key: str, value: tuple[str, ...], available: LayerTable, backbone: str) -> None:
    """Reject layer names the backbone does not expose as feature maps, repeats and shuffles."""
    where = f"params.yaml: models.{name}.{key}"
    for layer in value:
        if layer not in available:
            raise ParamsError(
                f"{where}: unknown layer {layer!r} for {backbone}; available: {', '.join(available)}"
            )
    if len(set(value)) != len(value):
        raise ParamsError(f"{where}: lists a layer twice: {list(value)}")
    # Feature maps are concatenated/compared in network order; a shuffled list is almost surely a typo.
    order = list(available)
    if list(value) != sorted(value, key=order.index):
        raise param_error(f"models.{name}.{key}", f"in network order {order}", list(value))


def model_settings(name: str, params: Params | Mapping[str, Any]) -> ModelSettings:
    """``models.<name>`` typed by the table and checked against the backbone and ``data.image_size``."""
    p = as_params(params)
    if name not in MODELS:
        raise ParamsError(f"unknown model {name!r}; supported: {', '.join(SUPPORTED_MODELS)}")
    models = p.need("models")
    if name not in models:
        raise ParamsError(f"model {name!r} has no section under 'models' in params.yaml")
    cfg = parse(MODELS[name].settings, models[name], f"models.{name}")
    backbone = backbone_spec(p).name
    try:
        available = feature_layers(backbone)
    except BackboneError as exc:
        raise ParamsError(str(exc)) from exc
    for key in ("layers", "layer"):
        if key in type(cfg).model_fields:
            value = getattr(cfg, key)
            _check_layers(name, key, (value,) if isinstance(value, str) else value, available, backbone)
    return cfg


def model_params(name: str, params: Params | Mapping[str, Any]) -> dict[str, Any]:
    """The validated ``models.<name>`` as the model's constructor arguments plus ``max_epochs``.

    It is what gets logged to MLflow, so it reflects defaults that were filled in and arguments
    derived from the backbone (FRE's ``input_dim``).
    """
    p = as_params(params)
    cfg = model_settings(name, p)
    available = feature_layers(backbone_spec(p).name)
    derived = MODELS[name].check(name, cfg, available, p.need("data").image_size)
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.model_dump().items()}
    return out | derived


def _evaluator() -> Any:
    """Image AUROC/F1 only (evaluate.py feeds them its own per-image pass: ``image_metrics``).

    Pixel metrics are not anomalib's here: its pixel ``AUROC`` keeps every test pixel and its ``PRO``
    (one fixed threshold, not the literature's AU-PRO) needs gigabytes under deterministic mode, so
    evaluate.py computes ``pixel_AUROC`` and ``pixel_AUPRO`` in bounded memory
    (:mod:`experiments.metrics`).
    """
    from anomalib.metrics import AUROC, Evaluator, F1Score

    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
        ]
    )


def _pre_processor(size: int, spec: BackboneSpec) -> Any:
    """anomalib's default pre-processor (resize + normalise, baked into the ONNX export), normalised
    with the statistics the backbone's weights expect (:meth:`BackboneSpec.input_normalization`)."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    mean, std = spec.input_normalization()
    return PreProcessor(
        transform=Compose([Resize((size, size), antialias=True), Normalize(mean=mean, std=std)])
    )


def input_normalization(model: AnomalibModule) -> dict[str, list[float]]:
    """The per-channel mean/std the model's own pre-processor (the one baked into its ONNX) applies.

    Read from the module, not from params, so train.json, summary.json and serving's metadata.json
    record what the exported graph does, whatever params say now.
    """
    from torchvision.transforms.v2 import Normalize

    for transform in getattr(model.pre_processor.transform, "transforms", [model.pre_processor.transform]):
        if isinstance(transform, Normalize):
            return {"mean": [float(m) for m in transform.mean], "std": [float(s) for s in transform.std]}
    raise ValueError(f"{type(model).__name__}: pre-processor has no Normalize step")


def build_model(
    name: str,
    params: Params | Mapping[str, Any],
    *,
    visualizer: bool = False,
) -> AnomalibModule:
    """Return a fresh anomalib module for ``name`` configured from ``params``.

    ``visualizer`` is off by default: anomalib's visualizer writes one image per test sample, while
    the pipeline only keeps ``evaluate.n_heatmaps`` overlays (written by evaluate.py). The
    post-processor applies ``train.threshold`` (:func:`experiments.metrics.make_post_processor`).
    """
    from experiments.metrics import ThresholdPolicy, make_post_processor

    p = as_params(params)
    policy = ThresholdPolicy.from_section(p.train.threshold)
    kwargs = model_params(name, p)
    kwargs.pop("max_epochs")
    size = p.need("data").image_size

    from experiments.backbones import configure_offline

    spec = backbone_spec(p)
    try:  # before anomalib builds the backbone: pre_trained=True then resolves offline
        configure_offline(spec=spec)
    except BackboneError as exc:
        raise ParamsError(str(exc)) from exc

    row = MODELS[name]
    cls = row.model_class()
    common: dict[str, Any] = {
        "backbone": spec.name,
        "pre_processor": _pre_processor(size, spec),
        "evaluator": _evaluator(),
        "post_processor": make_post_processor(policy),
        "visualizer": visualizer,
    }
    if row.pre_trained:
        common["pre_trained"] = True
    # Seed again right before construction: the model's own random draws (PaDiM's channel subset via
    # Python's `random`, the initial weights of STFPM's student, FRE, SuperSimpleNet) must depend on
    # params only. Imports and the first-run weight conversion above consume RNG draws on some runs
    # and not others: a fresh machine's first run picked other PaDiM channels than every later run.
    seed_everything(p.seed or 0)
    return cls(**common, **kwargs)
