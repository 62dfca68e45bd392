"""Build the anomalib models compared by the pipeline, from ``params.yaml`` only.

One factory, :func:`build_model`, so that ``train`` and ``evaluate`` construct *exactly* the same
module (same layers, same pre-/post-processing, same metrics) and a checkpoint written by one loads
into the other. Every model uses the ImageNet ``tf_efficientnet_lite0`` backbone that
:mod:`experiments.backbones` makes available offline, and a pre-processor that resizes to
``data.image_size`` (+ ImageNet normalisation), which anomalib bakes into the ONNX export.

Parameters are validated here, before anything heavy is imported, because anomalib's own checks
are either late (after the backbone is built) or silent: an unknown layer name is dropped with a
warning and training carries on with fewer layers. A typo in ``params.yaml`` must fail loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from experiments.backbones import FEATURE_LAYERS, TIMM_NAME
from experiments.config import ParamsError

if TYPE_CHECKING:  # keep `import experiments.models` cheap: torch/anomalib load only when building
    from anomalib.models import AnomalibModule

SUPPORTED_BACKBONES = (TIMM_NAME,)
DFM_SCORE_TYPES = ("fre", "nll")

# Keys each model accepts under ``models.<name>``; ``max_epochs`` is read by train.py.
MODEL_KEYS: dict[str, set[str]] = {
    "padim": {"layers", "n_features", "max_epochs"},
    "patchcore": {"layers", "coreset_sampling_ratio", "num_neighbors", "max_epochs"},
    "stfpm": {"layers", "max_epochs"},
    "dfm": {"layer", "pooling_kernel_size", "pca_level", "score_type", "max_epochs"},
}
SUPPORTED_MODELS = tuple(MODEL_KEYS)


def _where(name: str, key: str) -> str:
    return f"params.yaml: models.{name}.{key}"


def _layers(name: str, cfg: Mapping[str, Any], key: str = "layers") -> list[str]:
    """Return the layer list, rejecting names the backbone does not expose as feature maps."""
    value = cfg.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ParamsError(f"{_where(name, key)} must be a non-empty list of layer names, got {value!r}")
    for layer in value:
        if layer not in FEATURE_LAYERS:
            raise ParamsError(
                f"{_where(name, key)}: unknown layer {layer!r} for {TIMM_NAME}; "
                f"available: {', '.join(FEATURE_LAYERS)}"
            )
    if len(set(value)) != len(value):
        raise ParamsError(f"{_where(name, key)} lists a layer twice: {value}")
    # Feature maps are concatenated/compared in network order; a shuffled list is almost surely a typo.
    order = list(FEATURE_LAYERS)
    if value != sorted(value, key=order.index):
        raise ParamsError(f"{_where(name, key)} must be in network order {order}, got {value}")
    return list(value)


def _int(name: str, cfg: Mapping[str, Any], key: str, minimum: int, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParamsError(f"{_where(name, key)} must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction(name: str, cfg: Mapping[str, Any], key: str) -> float:
    value = cfg.get(key)
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
    backbone = (params.get("backbone") or {}).get("name")
    if backbone not in SUPPORTED_BACKBONES:
        raise ParamsError(
            f"params.yaml: backbone.name {backbone!r} has no offline weights; "
            f"supported: {SUPPORTED_BACKBONES}"
        )
    image_size = (params.get("data") or {}).get("image_size")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise ParamsError(
            f"params.yaml: data.image_size must be a multiple of 32 (>= 32), got {image_size!r}"
        )

    out: dict[str, Any] = {"max_epochs": _int(name, cfg, "max_epochs", 1, default=1)}
    if name == "padim":
        layers = _layers(name, cfg)
        available = sum(FEATURE_LAYERS[layer][0] for layer in layers)
        n_features = _int(name, cfg, "n_features", 1)
        if n_features > available:
            raise ParamsError(
                f"{_where(name, 'n_features')} = {n_features} is larger than the {available} channels "
                f"of layers {layers} ({', '.join(f'{la}: {FEATURE_LAYERS[la][0]}' for la in layers)})"
            )
        out |= {"layers": layers, "n_features": n_features}
    elif name == "patchcore":
        out |= {
            "layers": _layers(name, cfg),
            "coreset_sampling_ratio": _fraction(name, cfg, "coreset_sampling_ratio"),
            "num_neighbors": _int(name, cfg, "num_neighbors", 1),
        }
    elif name == "stfpm":
        out |= {"layers": _layers(name, cfg)}
    elif name == "dfm":
        layers = _layers(name, cfg, "layer")
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
    """Image AUROC/F1 only.

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

    configure_offline()  # before anomalib builds the backbone: pre_trained=True resolves offline

    from anomalib.models import Dfm, Padim, Patchcore, Stfpm

    classes: dict[str, Callable[..., AnomalibModule]] = {
        "padim": Padim,
        "patchcore": Patchcore,
        "stfpm": Stfpm,
        "dfm": Dfm,
    }
    cls = classes[name]
    common: dict[str, Any] = {
        "backbone": TIMM_NAME,
        "pre_processor": cls.configure_pre_processor(image_size=(size, size)),
        "evaluator": _evaluator(),
        "post_processor": make_post_processor(policy),
        "visualizer": visualizer,
    }
    if name != "stfpm":  # STFPM's teacher is always pretrained and its student never is
        common["pre_trained"] = True
    return cls(**common, **kwargs)
