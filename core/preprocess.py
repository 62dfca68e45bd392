"""The one image pre-processing rule shared by training, evaluation, promotion and serving.

Why one module: anomalib's ONNX graph starts with its own resize + the backbone's input normalisation, but it
only ever sees what we feed it. If ``prepare`` (which writes the training images), ``evaluate``
(ONNX-vs-torch check, heat maps), ``promote`` (parity check) and the Lambda each decoded and
resized images their own way, a model would be measured on pixels it never gets in production.
So every one of them calls :func:`fit_image` (images) / :func:`fit_mask` (ground-truth masks)
from here, and the graph's own resize is an identity because the input already has its size.
Only numpy and Pillow are used: this file ships in the torch-free Lambda image.

**Bit depth and modes** (:func:`to_float_rgb`). Pixels are scaled by the range of their *dtype*,
never clipped: 8-bit by 255, 16-bit (``I;16``, ``I;16B``, ``I;16L``, 16-bit RGB passed as a
``uint16`` numpy array) by 65535, and Pillow's ``I`` mode - what it decodes 16-bit PNG/TIFF into -
also by 65535 (values outside [0, 65535] are refused, they are not 16-bit data). ``F`` (float)
images must already be in [0, 1]. The dtype range, not the per-image min/max, because a
stretch per image would erase exactly the global brightness differences (a dark, dead solar cell;
an over-exposed part) that can be the defect, and would make a flat normal image look noisy.
Consequence: 12-bit data stored in 16-bit containers looks dark to the model - consistently so in
training and serving. Grey (``1``, ``L``, ``I*``, ``F``) is replicated to three channels; ``P`` is
expanded through its palette; ``CMYK``/``YCbCr``/``LAB``/``HSV`` are converted to RGB by Pillow;
alpha (``LA``, ``RGBA``, ``PA``, palette transparency) is composited over black, the same colour
the letterbox padding uses, so transparent areas look like "no content".

**Geometry** (:func:`fit_image`, ``params.yaml: data.resize``):

* ``letterbox`` (default): scale so the longer side fits, keep the aspect ratio, pad the rest with
  black, centred. Nothing of the part is cut off and nothing is distorted, which matters when one
  data set mixes 100x280 and 620x250 photos. For square images it equals ``stretch``.
* ``stretch``: resize to the target size, ignoring the aspect ratio (the pre-2026 behaviour; fine
  when every image has the same shape).
* ``center_crop``: scale the shorter side to fit and cut the centre; borders are *not inspected*
  (the overlay shows them unscored), so only use it when the part is always centred.

Resampling is bilinear on float32 per channel (no 8-bit rounding before the resize), then the
result is rounded once to uint8: the stored training PNG and the served tensor hold the same
8-bit values. Masks use nearest-neighbour and are binarised (any non-zero = defect).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
from PIL import Image

# The resize policy: how an image of any size is fitted to the model's square input. Python calls it
# ``resize`` everywhere (params.yaml: data.resize, summary.json: resize); metadata.json's versioned
# contract field is ``input.geometry``. Its values and its one default are defined here.
ResizePolicy = Literal["letterbox", "stretch", "center_crop"]
RESIZE_POLICIES: tuple[str, ...] = get_args(ResizePolicy)
DEFAULT_RESIZE: ResizePolicy = "letterbox"
# How integer pixels become [0, 1]; recorded in metadata.json (``input.bit_depth``).
BIT_DEPTH_RULE = "dtype_range"
PAD_VALUE = 0.0  # black: letterbox padding and the background alpha is composited over

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_CONVERTED_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
SUPPORTED_MODES: tuple[str, ...] = (
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "I", "F", *_SIXTEEN_BIT_MODES, *_CONVERTED_TO_RGB,
)  # fmt: skip


class PreprocessError(ValueError):
    """The image (or the requested policy) cannot be turned into model input; the message says why."""


def check_resize(value: object, where: str = "resize policy") -> ResizePolicy:
    """Return ``value`` as a policy or raise naming the allowed ones (for params and metadata)."""
    if value not in RESIZE_POLICIES:
        raise PreprocessError(f"{where} must be one of {', '.join(RESIZE_POLICIES)}; got {value!r}")
    return value  # type: ignore[return-value]


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    """``S`` or ``(height, width)`` -> ``(height, width)``, both >= 1."""
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise PreprocessError(f"target size must be positive, got {size!r}")
    return height, width


def _from_array(array: np.ndarray) -> np.ndarray:
    """A numpy image (HxW, HxWx1/3/4; uint8, uint16 or float in [0, 1]) as float32 HxWx3 in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise PreprocessError(f"image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if array.dtype == np.uint8:
        scaled = array.astype(np.float32) / np.float32(255.0)
    elif array.dtype == np.uint16:
        scaled = array.astype(np.float32) / np.float32(65535.0)
    elif array.dtype.kind == "f":
        scaled = array.astype(np.float32)
        if not np.all(np.isfinite(scaled)) or scaled.min() < 0.0 or scaled.max() > 1.0:
            raise PreprocessError("float image must hold finite values in [0, 1]")
    else:
        raise PreprocessError(f"image dtype {array.dtype} is not supported (use uint8, uint16 or float)")
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[:, :, None], 3, axis=2)
    if scaled.shape[2] == 4:  # straight alpha over black
        scaled = scaled[:, :, :3] * scaled[:, :, 3:4] + PAD_VALUE * (1.0 - scaled[:, :, 3:4])
    return np.ascontiguousarray(scaled, dtype=np.float32)


def to_float_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """Apply the bit-depth and mode rule (module docstring): float32 ``HxWx3`` in [0, 1]."""
    if isinstance(image, np.ndarray):
        return _from_array(image)
    mode = image.mode
    if mode not in SUPPORTED_MODES:
        raise PreprocessError(f"image mode {mode!r} is not supported; save it as 8/16-bit grey or RGB (PNG)")
    if mode in _SIXTEEN_BIT_MODES:
        return _from_array(np.asarray(image).astype(np.uint16))
    if mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise PreprocessError(
                f"32-bit integer image with values in [{values.min()}, {values.max()}] is not 16-bit data; "
                "save it as a 16-bit PNG/TIFF"
            )
        return _from_array(values.astype(np.uint16))
    if mode == "F":
        return _from_array(np.asarray(image, dtype=np.float32))
    if mode == "1":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "La"):
        image = image.convert("RGBA" if mode == "PA" else "LA")
    elif mode in _CONVERTED_TO_RGB:
        image = image.convert("RGB")
    elif mode == "RGBa":  # premultiplied: un-premultiply first so the rule below is uniform
        image = image.convert("RGBA")
    array = np.asarray(image)
    if image.mode == "LA":
        array = np.stack([array[:, :, 0]] * 3 + [array[:, :, 1]], axis=2)
    return _from_array(array)


def to_rgb8(image: Image.Image | np.ndarray) -> np.ndarray:
    """The display version of an image at its own size (bit-depth rule applied): uint8 ``HxWx3``.

    Used for overlays, so an operator sees the 16-bit picture the model saw, not a white sheet.
    """
    return _quantise(to_float_rgb(image))


def _quantise(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def _resize_float(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of float32 ``HxWxC`` channel by channel (Pillow ``F`` mode, antialiased)."""
    if array.shape[1] == width and array.shape[0] == height:
        return array
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(array[:, :, c]), mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        for c in range(array.shape[2])
    ]
    return np.stack(channels, axis=2)


def content_box(
    width: int, height: int, size: int | Sequence[int], resize: str
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Where the image goes: ``(source box in the original, destination box in the target)``.

    Boxes are ``(left, top, right, bottom)`` in pixels. ``stretch``: whole image -> whole target;
    ``letterbox``: whole image -> centred box with the image's aspect ratio; ``center_crop``: the
    centred region with the target's aspect ratio -> whole target. :func:`map_to_original` uses
    the same boxes backwards, so the two can never disagree.
    """
    resize = check_resize(resize)
    out_h, out_w = _size(size)
    if width < 1 or height < 1:
        raise PreprocessError(f"image has no pixels ({width}x{height})")
    if resize == "stretch":
        return (0, 0, width, height), (0, 0, out_w, out_h)
    if resize == "letterbox":
        scale = min(out_w / width, out_h / height)
        new_w = min(out_w, max(1, round(width * scale)))
        new_h = min(out_h, max(1, round(height * scale)))
        left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
        return (0, 0, width, height), (left, top, left + new_w, top + new_h)
    # center_crop: the largest centred region with the target's aspect ratio
    scale = max(out_w / width, out_h / height)
    crop_w = min(width, max(1, round(out_w / scale)))
    crop_h = min(height, max(1, round(out_h / scale)))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return (left, top, left + crop_w, top + crop_h), (0, 0, out_w, out_h)


def fit_image(image: Image.Image | np.ndarray, size: int | Sequence[int], resize: str) -> np.ndarray:
    """THE pre-processing: bit-depth rule, then the resize policy ``resize`` to ``size``; uint8 ``HxWx3`` RGB.

    ``prepare`` saves this array as the training PNG and serving feeds ``array / 255``, so both
    sides see the same 8-bit values.
    """
    out_h, out_w = _size(size)
    rgb = to_float_rgb(image)
    (sl, st, sr, sb), (dl, dt, dr, db) = content_box(rgb.shape[1], rgb.shape[0], (out_h, out_w), resize)
    resized = _resize_float(rgb[st:sb, sl:sr], dr - dl, db - dt)
    canvas = np.full((out_h, out_w, 3), PAD_VALUE, dtype=np.float32)
    canvas[dt:db, dl:dr] = resized
    return _quantise(canvas)


def to_model_input(rgb8: np.ndarray) -> np.ndarray:
    """uint8 ``HxWx3`` -> ``float32[1, 3, H, W]`` in [0, 1], the ONNX graph's input."""
    if rgb8.dtype != np.uint8 or rgb8.ndim != 3 or rgb8.shape[2] != 3:
        raise PreprocessError(f"expected uint8 HxWx3, got {rgb8.dtype} {rgb8.shape}")
    array = rgb8.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[np.newaxis])


def model_input(image: Image.Image | np.ndarray, size: int | Sequence[int], resize: str) -> np.ndarray:
    """``to_model_input(fit_image(...))``: what serving, evaluate and promote feed the graph."""
    return to_model_input(fit_image(image, size, resize))


def fit_mask(mask: Image.Image | np.ndarray, size: int | Sequence[int], resize: str) -> np.ndarray:
    """A ground-truth mask with the image's geometry: nearest-neighbour, uint8 {0, 255} ``HxW``.

    Letterbox padding is 0 (not defective): it was never part of the part.
    """
    out_h, out_w = _size(size)
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array.max(axis=2)
    binary = Image.fromarray(np.where(array > 0, 255, 0).astype(np.uint8), mode="L")
    (sl, st, sr, sb), (dl, dt, dr, db) = content_box(binary.width, binary.height, (out_h, out_w), resize)
    resized = binary.crop((sl, st, sr, sb)).resize((dr - dl, db - dt), Image.Resampling.NEAREST)
    canvas = np.zeros((out_h, out_w), dtype=np.uint8)
    canvas[dt:db, dl:dr] = np.asarray(resized)
    return canvas


def map_to_original(anomaly_map: np.ndarray, width: int, height: int, resize: str) -> np.ndarray:
    """An anomaly map at model size back onto the original ``width x height`` image (float32 ``HxW``).

    Letterbox padding is dropped; with ``center_crop`` the cut-off borders get 0 (not scored).
    """
    heat = np.asarray(anomaly_map, dtype=np.float32)
    if heat.ndim != 2:
        raise PreprocessError(f"anomaly map must be 2-D, got shape {heat.shape}")
    (sl, st, sr, sb), (dl, dt, dr, db) = content_box(width, height, heat.shape, resize)
    part = _resize_float(heat[dt:db, dl:dr, None], sr - sl, sb - st)[:, :, 0]
    out = np.zeros((height, width), dtype=np.float32)
    out[st:sb, sl:sr] = part
    return out
