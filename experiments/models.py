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

Parameters are validated here, before anything heavy is imported, because anomalib's own checks
are either late (after the backbone is built) or silent: an unknown layer name is dropped with a
warning and training carries on with fewer layers. A typo in ``params.yaml`` must fail loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from config.params import ParamsError
from core.preprocess import DEFAULT_RESIZE, PreprocessError, check_policy
from experiments.backbones import BackboneError, BackboneSpec, feature_layers, resolve_backbone
from experiments.runtime import seed_everything

if TYPE_CHECKING:  # keep `import experiments.models` cheap: torch/anomalib load only when building
    from anomalib.models import AnomalibModule

DFM_SCORE_TYPES = ("fre", "nll")
SSN_MIN_MAP = 32  # anomalib's Perlin generator draws scales up to 2**5

# Keys each model accepts under ``models.<name>``; ``max_epochs`` is read by train.py.
MODEL_KEYS: dict[str, set[str]] = {
    "padim": {"layers", "n_features", "max_epochs"},
    "patchcore": {"layers", "coreset_sampling_ratio", "num_neighbors", "max_epochs"},
    "stfpm": {"layers", "max_epochs"},
    "dfm": {"layer", "pooling_kernel_size", "pca_level", "score_type", "max_epochs"},
    "fre": {"layer", "pooling_kernel_size", "latent_dim", "max_epochs"},
    "supersimplenet": {"layers", "perlin_threshold", "max_epochs"},
}
SUPPORTED_MODELS = tuple(MODEL_KEYS)


def _where(name: str, key: str) -> str:
    return f"params.yaml: models.{name}.{key}"


def resize_policy(params: Mapping[str, Any]) -> str:
    """``data.resize`` (default ``letterbox``), validated: the policy every stage and serving use."""
    try:
        return check_policy(
            (params.get("data") or {}).get("resize", DEFAULT_RESIZE), "params.yaml: data.resize"
        )
    except PreprocessError as exc:
        raise ParamsError(str(exc)) from exc


def backbone_spec(params: Mapping[str, Any]) -> BackboneSpec:
    """``params.yaml: backbone`` resolved (weights source checked), as a :class:`ParamsError`."""
    try:
        return resolve_backbone(params)
    except BackboneError as exc:
        raise ParamsError(str(exc)) from exc


def _layers(
    name: str,
    cfg: Mapping[str, Any],
    available: Mapping[str, tuple[int, int]],
    backbone: str,
    key: str = "layers",
) -> list[str]:
    """Return the layer list, rejecting names the backbone does not expose as feature maps."""
    value = cfg.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ParamsError(f"{_where(name, key)} must be a non-empty list of layer names, got {value!r}")
    for layer in value:
        if layer not in available:
            raise ParamsError(
                f"{_where(name, key)}: unknown layer {layer!r} for {backbone}; "
                f"available: {', '.join(available)}"
            )
    if len(set(value)) != len(value):
        raise ParamsError(f"{_where(name, key)} lists a layer twice: {value}")
    # Feature maps are concatenated/compared in network order; a shuffled list is almost surely a typo.
    order = list(available)
    if value != sorted(value, key=order.index):
        raise ParamsError(f"{_where(name, key)} must be in network order {order}, got {value}")
    return list(value)


def _int(name: str, cfg: Mapping[str, Any], key: str, minimum: int, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParamsError(f"{_where(name, key)} must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction(name: str, cfg: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ParamsError(f"{_where(name, key)} must be a number in (0, 1], got {value!r}")
    return float(value)


def model_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``models.<name>`` (and ``backbone``/``data.image_size``) and return normalised kwargs.

    The returned dict holds the model's constructor arguments plus ``max_epochs``; it is what gets
    logged to MLflow, so it reflects defaults that were filled in.
    """
    models = params.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ParamsError("params.yaml: 'models' must be a mapping of model name -> settings")
    if name not in MODEL_KEYS:
        raise ParamsError(f"unknown model {name!r}; supported: {', '.join(SUPPORTED_MODELS)}")
    if name not in models:
        raise ParamsError(f"model {name!r} has no section under 'models' in params.yaml")
    cfg = models[name] or {}
    if not isinstance(cfg, Mapping):
        raise ParamsError(f"params.yaml: models.{name} must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - MODEL_KEYS[name])
    if unknown:
        raise ParamsError(
            f"params.yaml: models.{name} has unknown key(s) {unknown}; allowed: {sorted(MODEL_KEYS[name])}"
        )
    backbone = backbone_spec(params).name
    try:
        available = feature_layers(backbone)
    except BackboneError as exc:
        raise ParamsError(str(exc)) from exc
    image_size = (params.get("data") or {}).get("image_size")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise ParamsError(
            f"params.yaml: data.image_size must be a multiple of 32 (>= 32), got {image_size!r}"
        )

    out: dict[str, Any] = {"max_epochs": _int(name, cfg, "max_epochs", 1, default=1)}
    if name == "padim":
        layers = _layers(name, cfg, available, backbone)
        channels = sum(available[layer][0] for layer in layers)
        n_features = _int(name, cfg, "n_features", 1)
        if n_features > channels:
            raise ParamsError(
                f"{_where(name, 'n_features')} = {n_features} is larger than the {channels} channels "
                f"of layers {layers} ({', '.join(f'{la}: {available[la][0]}' for la in layers)})"
            )
        out |= {"layers": layers, "n_features": n_features}
    elif name == "patchcore":
        out |= {
            "layers": _layers(name, cfg, available, backbone),
            "coreset_sampling_ratio": _fraction(name, cfg, "coreset_sampling_ratio"),
            "num_neighbors": _int(name, cfg, "num_neighbors", 1),
        }
    elif name == "stfpm":
        out |= {"layers": _layers(name, cfg, available, backbone)}
    elif name == "fre":
        layers = _layers(name, cfg, available, backbone, "layer")
        if len(layers) != 1:
            raise ParamsError(f"{_where(name, 'layer')} must be a single layer name, got {layers}")
        channels, stride = available[layers[0]]
        pool = _int(name, cfg, "pooling_kernel_size", 1, default=2)
        side = image_size // stride // pool
        if side < 1:
            raise ParamsError(f"{_where(name, 'pooling_kernel_size')} = {pool} leaves no feature map")
        # FRE's autoencoder works on the flattened pooled map, so its input size follows the params.
        out |= {
            "layer": layers[0],
            "pooling_kernel_size": pool,
            "latent_dim": _int(name, cfg, "latent_dim", 1, default=220),
            "input_dim": channels * side * side,
        }
    elif name == "supersimplenet":
        layers = _layers(name, cfg, available, backbone)
        # Features are upscaled to 2x the first layer's map and anomalib draws Perlin noise on it
        # at random scales up to 32: a smaller map crashes training at random (empty noise grid).
        side = 2 * image_size // available[layers[0]][1]
        if side < SSN_MIN_MAP:
            raise ParamsError(
                f"{_where(name, 'layers')}: {layers[0]} gives a {side}x{side} feature map at "
                f"data.image_size {image_size}; SuperSimpleNet needs >= {SSN_MIN_MAP} (use an earlier "
                f"layer, stride <= {2 * image_size // SSN_MIN_MAP}, or a larger image_size)"
            )
        out |= {"layers": layers, "perlin_threshold": _fraction(name, cfg, "perlin_threshold", default=0.2)}
    elif name == "dfm":
        layers = _layers(name, cfg, available, backbone, "layer")
        if len(layers) != 1:
            raise ParamsError(f"{_where(name, 'layer')} must be a single layer name, got {layers}")
        score_type = cfg.get("score_type", "fre")
        if score_type not in DFM_SCORE_TYPES:
            raise ParamsError(
                f"{_where(name, 'score_type')} must be one of {DFM_SCORE_TYPES}, got {score_type!r}"
            )
        out |= {
            "layer": layers[0],
            "pooling_kernel_size": _int(name, cfg, "pooling_kernel_size", 1),
            "pca_level": _fraction(name, cfg, "pca_level"),
            "score_type": score_type,
        }
    return out


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
    params: Mapping[str, Any],
    *,
    visualizer: bool = False,
) -> AnomalibModule:
    """Return a fresh anomalib module for ``name`` configured from ``params``.

    ``visualizer`` is off by default: anomalib's visualizer writes one image per test sample, while
    the pipeline only keeps ``evaluate.n_heatmaps`` overlays (written by evaluate.py). The
    post-processor applies ``train.threshold`` (:func:`experiments.metrics.make_post_processor`).
    """
    from experiments.metrics import ThresholdPolicy, make_post_processor

    policy = ThresholdPolicy.from_params(params)
    kwargs = model_params(name, params)
    kwargs.pop("max_epochs")
    size = int(params["data"]["image_size"])

    from experiments.backbones import configure_offline

    spec = backbone_spec(params)
    try:  # before anomalib builds the backbone: pre_trained=True then resolves offline
        configure_offline(spec=spec)
    except BackboneError as exc:
        raise ParamsError(str(exc)) from exc

    from anomalib.models import Dfm, Fre, Padim, Stfpm, Supersimplenet

    from experiments.coreset import FastCoresetPatchcore

    classes: dict[str, Callable[..., AnomalibModule]] = {
        "padim": Padim,
        "patchcore": FastCoresetPatchcore,  # anomalib's PatchCore, coreset selection ~4x faster
        "stfpm": Stfpm,
        "dfm": Dfm,
        "fre": Fre,
        "supersimplenet": Supersimplenet,
    }
    cls = classes[name]
    common: dict[str, Any] = {
        "backbone": spec.name,
        "pre_processor": _pre_processor(size, spec),
        "evaluator": _evaluator(),
        "post_processor": make_post_processor(policy),
        "visualizer": visualizer,
    }
    # STFPM's teacher is always pretrained and its student never is; SuperSimpleNet's extractor
    # is always pretrained.
    if name not in ("stfpm", "supersimplenet"):
        common["pre_trained"] = True
    # Seed again right before construction: the model's own random draws (PaDiM's channel subset via
    # Python's `random`, the initial weights of STFPM's student, FRE, SuperSimpleNet) must depend on
    # params only. Imports and the first-run weight conversion above consume RNG draws on some runs
    # and not others: a fresh machine's first run picked other PaDiM channels than every later run.
    seed_everything(int(params.get("seed", 0)))
    return cls(**common, **kwargs)
