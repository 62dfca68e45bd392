"""The shared pre-processing (core/preprocess.py): bit depth, modes, geometry, masks, inverse map.

Torch-free and fast: these are the rules every stage and the Lambda apply, so each is pinned here
on synthetic images whose correct answer is known by construction.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.preprocess import (
    RESIZE_POLICIES,
    PreprocessError,
    check_resize,
    content_box,
    fit_image,
    fit_mask,
    map_to_original,
    model_input,
    to_rgb8,
)


def _scene(width: int, height: int) -> np.ndarray:
    """uint8 grey picture: a horizontal ramp plus a bright square in the middle (the 'part')."""
    ramp = np.tile(np.linspace(20, 200, width, dtype=np.float32), (height, 1))
    cy, cx, r = height // 2, width // 2, min(width, height) // 6
    ramp[cy - r : cy + r, cx - r : cx + r] = 250
    return ramp.astype(np.uint8)


def _png_roundtrip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    reopened.load()
    return reopened


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
@pytest.mark.parametrize("size", [(100, 280), (620, 250)])  # (width, height) as in the issue
def test_sixteen_bit_grey_matches_its_8bit_twin(policy: str, size: tuple[int, int]) -> None:
    grey8 = _scene(*size)
    grey16 = grey8.astype(np.uint16) * 257  # the same picture at 16 bits (255 -> 65535)
    eight = fit_image(Image.fromarray(grey8), 64, policy)
    png16 = _png_roundtrip(Image.fromarray(grey16))  # Pillow decodes 16-bit PNG as I;16
    big_endian = Image.frombytes("I;16B", size, grey16.astype(">u2").tobytes())
    as_int32 = Image.fromarray(grey16.astype(np.int32))  # mode "I"
    for sixteen in (png16, big_endian, as_int32):
        got = fit_image(sixteen, 64, policy)
        assert np.abs(got.astype(int) - eight.astype(int)).max() <= 1, sixteen.mode
        assert got.mean() < 250  # not clipped to white, which convert("RGB") would do
    assert png16.mode.startswith("I")


def test_sixteen_bit_rgb_array_is_scaled_by_range() -> None:
    rgb8 = np.stack([_scene(90, 60), _scene(90, 60)[::-1], np.full((60, 90), 7, np.uint8)], axis=2)
    got = fit_image(rgb8.astype(np.uint16) * 257, 32, "letterbox")
    want = fit_image(rgb8, 32, "letterbox")
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_dtype_range_is_the_rule_not_per_image_stretch() -> None:
    """A dark 16-bit image stays dark: brightness is information (stated rule: dtype range)."""
    dark = np.full((40, 40), 4096, np.uint16)  # 1/16 of full scale
    out = fit_image(Image.fromarray(dark), 32, "stretch")
    assert out.max() == round(4096 / 65535 * 255)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("RGB", (10, 200, 30)),
        ("CMYK", (10, 200, 30)),
        ("RGBA", (10, 200, 30)),
        ("L", None),
        ("1", None),
        ("P", None),
        ("LA", None),
        ("YCbCr", None),
    ],
)
def test_every_common_mode_becomes_rgb(mode: str, expected: tuple[int, int, int] | None) -> None:
    source = Image.new("RGB", (40, 30), (10, 200, 30))
    image = source.convert(mode)
    out = fit_image(image, 32, "stretch")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if expected is None:  # Pillow's own RGB view of the same picture (mode "1" is dithered: compare means)
        reference = np.asarray(image.convert("RGB"), dtype=np.float32)
        np.testing.assert_allclose(out.mean(axis=(0, 1)), reference.mean(axis=(0, 1)), atol=3)
    else:
        np.testing.assert_allclose(out[16, 16], expected, atol=2)


def test_alpha_is_composited_over_black() -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :10, 3] = 255  # left half opaque, right half fully transparent
    rgba[:, 10:, 3] = 0
    out = to_rgb8(Image.fromarray(rgba, mode="RGBA"))
    assert (out[:, :10] == 200).all() and (out[:, 10:] == 0).all()
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    assert (to_rgb8(la)[:, 10:] == 0).all() and (to_rgb8(la)[:, :10] == 200).all()


def test_out_of_range_int_image_is_refused_with_the_fix() -> None:
    wide = Image.fromarray(np.full((40, 40), 70000, np.int32))
    with pytest.raises(PreprocessError, match=r"not 16-bit data.*16-bit PNG"):
        fit_image(wide, 32, "letterbox")
    with pytest.raises(PreprocessError, match=r"\[0, 1\]"):
        fit_image(np.full((8, 8), 3.0, np.float32), 32, "letterbox")


def test_unknown_policy_is_named() -> None:
    with pytest.raises(PreprocessError, match="letterbox, stretch, center_crop; got 'squash'"):
        check_resize("squash", "params.yaml: data.resize")
    with pytest.raises(PreprocessError, match="squash"):
        fit_image(np.zeros((8, 8), np.uint8), 8, "squash")


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    image = np.full((100, 280), 255, np.uint8)  # wide white image: 280 x 100
    out = fit_image(image, 64, "letterbox")
    assert content_box(280, 100, 64, "letterbox")[1] == (0, 20, 64, 43)  # 64 x 23, centred
    assert (out[20:43] == 255).all()
    assert (out[:20] == 0).all() and (out[43:] == 0).all()
    tall = fit_image(np.full((620, 250), 255, np.uint8), 64, "letterbox")
    assert (tall[:, :19] == 0).all() and (tall[:, 45:] == 0).all() and (tall[:, 19:45] == 255).all()


def test_center_crop_cuts_the_borders_and_stretch_fills_the_square() -> None:
    image = np.zeros((100, 300), np.uint8)
    image[:, 100:200] = 255  # only the central third is white
    assert (fit_image(image, 60, "center_crop") == 255).all()
    stretched = fit_image(image, 60, "stretch")
    assert (stretched[:, :18] == 0).all() and (stretched[:, 22:38] == 255).all()


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_masks_follow_the_image_geometry(policy: str) -> None:
    grey = _scene(280, 100)
    mask = (grey == 250).astype(np.uint8)  # the bright square, values {0, 1}
    image = fit_image(grey, 64, policy)[:, :, 0]
    fitted = fit_mask(Image.fromarray(mask), 64, policy)
    assert set(np.unique(fitted)) == {0, 255}
    inside = image[fitted == 255]
    assert np.median(inside) >= 245  # the mask still covers the bright square after the policy
    assert np.median(image[fitted == 0]) < 200


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_map_to_original_inverts_the_policy(policy: str) -> None:
    grey = _scene(280, 100)
    fitted = fit_image(grey, 64, policy)[:, :, 0].astype(np.float32) / 255.0
    hot = (fitted > 0.95).astype(np.float32)  # the model "finds" the bright square
    back = map_to_original(hot, 280, 100, policy)
    assert back.shape == (100, 280)
    truth = grey == 250
    assert back[truth].mean() > 0.6 and back[~truth].mean() < 0.1
    ys, xs = np.nonzero(truth)
    weight = back / back.sum()
    rows, cols = np.indices(back.shape)
    assert abs((weight * cols).sum() - xs.mean()) < 3 and abs((weight * rows).sum() - ys.mean()) < 3


def test_model_input_layout_and_determinism() -> None:
    x = model_input(Image.fromarray(_scene(120, 90)), (32, 48), "letterbox")
    assert x.shape == (1, 3, 32, 48) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(x, model_input(Image.fromarray(_scene(120, 90)), (32, 48), "letterbox"))
