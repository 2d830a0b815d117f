"""Pixtral preprocessing against mistral-common's ImageEncoder (the reference) on fresh random
images, and against transformers' PIL PixtralImageProcessor where the two are meant to agree.

mistral-common resizes with OpenCV. When `cv2` is not importable (it is not one of our test
dependencies yet) its `cv2.resize` is replaced by a one-pass 2-D torch bicubic stand-in; everything
else (grid, rounding, tokens, RGB conversion, normalisation) is still mistral-common's own code.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers import image as mc_image
from PIL import Image

from mistralpy.processing.images import (
    ImagePolicy,
    ImageProcessorConfig,
    image_grid,
    load_image,
    preprocess_image,
)

IMG, BREAK, END = 10, 12, 13
MODES = ["RGB", "RGBA", "L", "LA", "P", "PA", "1"]
HAVE_CV2 = importlib.util.find_spec("cv2") is not None


class TorchCv2:
    """Stand-in for cv2.resize(INTER_CUBIC) on float32 (H, W, C): torch bicubic in one 2-D pass."""

    INTER_CUBIC = 2

    @staticmethod
    def resize(array: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
        assert interpolation == TorchCv2.INTER_CUBIC
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        y = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", align_corners=False)
        return y[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def encoder():
    """mistral-common's encoder for Mistral Small 3.1's settings (patch 14, merge 2, 1540)."""
    with pytest.MonkeyPatch.context() as patch:
        if not HAVE_CV2:
            patch.setattr(mc_image, "cv2", TorchCv2, raising=False)
            patch.setattr(mc_image, "assert_opencv_installed", lambda: None)
        config = mc_image.ImageConfig(
            image_patch_size=14, max_image_size=1540, spatial_merge_size=2
        )
        yield mc_image.ImageEncoder(config, mc_image.SpecialImageIDs(IMG, BREAK, END))


def random_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """Fresh random pixels in `mode`, with random transparency where the mode has any."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode in ("RGB", "RGBA"):
        return Image.fromarray(noise[..., : len(mode)], mode)
    if mode in ("L", "LA"):
        return Image.fromarray(
            noise[..., : len(mode)].squeeze(-1) if mode == "L" else noise[..., :2], mode
        )
    if mode == "1":
        return Image.fromarray(noise[..., 0] > 127)
    image = Image.fromarray(noise[..., 0] % 16, "P")  # palette, one entry transparent
    image.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tolist())
    if mode == "PA":
        return image.convert("PA") if "PA" in Image.MODES else image
    image.info["transparency"] = int(rng.integers(0, 16))
    return image


def assert_matches_mistral_common(encoder, image: Image.Image) -> None:
    reference = encoder(ImageChunk(image=image))
    ours = preprocess_image(image, ImageProcessorConfig())
    assert ours.placeholder_token_ids(IMG, BREAK, END) == reference.tokens
    assert tuple(ours.pixel_values.shape) == reference.image.shape
    assert ours.pixel_values.dtype == torch.float32
    assert np.abs(ours.pixel_values.numpy() - reference.image).max() <= 2e-2
    assert ours.num_prompt_tokens == len(reference.tokens)
    assert ours.num_image_tokens == reference.tokens.count(IMG)


SIZES = [(1, 1000), (333, 517), (1540, 1540), (4000, 30), (1, 1), (1541, 771), (30, 4000)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_named_sizes_match_mistral_common(encoder, width, height):
    assert_matches_mistral_common(encoder, random_image(width, height, "RGB", seed=width * height))


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(1, 1800),
    height=st.integers(1, 1800),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**32 - 1),
)
@example(width=1, height=1, mode="RGBA", seed=0)
@example(width=29, height=57, mode="P", seed=1)
def test_random_images_match_mistral_common(encoder, width, height, mode, seed):
    assert_matches_mistral_common(encoder, random_image(width, height, mode, seed))


@settings(max_examples=2000, deadline=None)
@given(
    width=st.integers(1, 40_000),
    height=st.integers(1, 40_000),
    patch=st.sampled_from([14, 16]),
    merge=st.sampled_from([1, 2]),
    longest=st.one_of(st.sampled_from([1024, 1540]), st.integers(16, 3000)),
)
@example(width=1, height=1000, patch=14, merge=2, longest=1540)
@example(width=40_000, height=1, patch=14, merge=2, longest=1540)
def test_token_grid_equals_mistral_common_for_every_size(width, height, patch, merge, longest):
    config = mc_image.ImageConfig(patch, longest, merge)
    reference = mc_image.ImageEncoder(config, mc_image.SpecialImageIDs(IMG, BREAK, END))
    cols, rows = reference._image_to_num_tokens(SimpleNamespace(size=(width, height)))
    cfg = ImageProcessorConfig(patch_size=patch, spatial_merge_size=merge, longest_edge=longest)
    assert image_grid(width, height, cfg) == (rows, cols)


def test_placeholder_layout():
    image = preprocess_image(Image.new("RGB", (3 * 28, 2 * 28)), ImageProcessorConfig())
    assert (image.rows, image.cols) == (2, 3)
    assert image.placeholder_token_ids(IMG, BREAK, END) == [IMG] * 3 + [BREAK] + [IMG] * 3 + [END]
    assert (image.num_image_tokens, image.num_prompt_tokens) == (6, 8)


# ----------------------------------------------------------------------------------------------
# Content hash


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def test_hash_ignores_the_encoding():
    image = random_image(45, 31, "RGB", seed=np.random.default_rng().integers(2**32))
    policy = ImagePolicy()
    hashes = set()
    for fmt, options in (("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})):
        data = encode(image, fmt, **options)
        raw = base64.b64encode(data).decode()
        for source in (raw, f"data:image/{fmt.lower()};base64,{raw}"):
            hashes.add(
                preprocess_image(load_image(source, policy), ImageProcessorConfig()).content_hash
            )
    assert len(hashes) == 1


def test_hash_sees_every_pixel_and_the_shape():
    cfg = ImageProcessorConfig()
    rng = np.random.default_rng()
    pixels = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    base = preprocess_image(Image.fromarray(pixels), cfg).content_hash
    changed = pixels.copy()
    changed[rng.integers(6), rng.integers(4), rng.integers(3)] ^= 1
    assert preprocess_image(Image.fromarray(changed), cfg).content_hash != base
    reshaped = Image.fromarray(pixels.reshape(4, 6, 3))  # same bytes, other size
    assert preprocess_image(reshaped, cfg).content_hash != base


def test_hash_is_of_what_the_model_sees():
    """Transparent pixels become white, whatever colour they hid: same input, same hash."""
    rng = np.random.default_rng()
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    other = rgba.copy()
    other[..., :3] = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    white = Image.new("RGB", (7, 5), "white")
    cfg = ImageProcessorConfig()
    hashes = {
        preprocess_image(im, cfg).content_hash
        for im in (Image.fromarray(rgba), Image.fromarray(other), white)
    }
    assert len(hashes) == 1


# ----------------------------------------------------------------------------------------------
# Config files


MISTRAL_SMALL_FILES = {
    "preprocessor_config.json": {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(mc_image.DATASET_MEAN),
        "image_processor_type": "PixtralImageProcessor",
        "image_std": list(mc_image.DATASET_STD),
        "patch_size": {"height": 14, "width": 14},
        "processor_class": "PixtralProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 1540},
    },
    "processor_config.json": {"image_token": "[IMG]", "patch_size": 14, "spatial_merge_size": 2},
    "config.json": {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "spatial_merge_size": 2,
        "vision_config": {"patch_size": 14, "image_size": 1540},
    },
}


def write_files(directory, files) -> None:
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content))


def test_config_from_hf_files(tmp_path):
    write_files(tmp_path, MISTRAL_SMALL_FILES)
    cfg = ImageProcessorConfig.from_model_dir(tmp_path)
    assert (cfg.patch_size, cfg.spatial_merge_size, cfg.longest_edge) == (14, 2, 1540)
    assert cfg.image_mean == mc_image.DATASET_MEAN and cfg.image_std == mc_image.DATASET_STD
    assert cfg.token_pixels == 28 and math.isclose(cfg.rescale_factor, 1 / 255)


def test_config_from_mistral_params(tmp_path):
    params = {"vision_encoder": {"patch_size": 16, "image_size": 1024, "spatial_merge_size": 2}}
    write_files(tmp_path, {"params.json": params})
    cfg = ImageProcessorConfig.from_model_dir(tmp_path)
    assert (cfg.patch_size, cfg.spatial_merge_size, cfg.longest_edge) == (16, 2, 1024)


@pytest.mark.parametrize(
    ("file", "key", "value"),
    [
        ("processor_config.json", "patch_size", 16),  # conflicts with the other files
        ("config.json", "spatial_merge_size", 1),
        ("preprocessor_config.json", "size", {"longest_edge": 1024}),
        ("preprocessor_config.json", "resample", 2),  # bilinear: not what mistral-common does
        ("preprocessor_config.json", "image_std", [0.5, 0.0, 0.5]),
    ],
)
def test_config_inconsistencies_raise(tmp_path, file, key, value):
    files = json.loads(json.dumps(MISTRAL_SMALL_FILES))
    files[file][key] = value
    write_files(tmp_path, files)
    with pytest.raises(ValueError):
        ImageProcessorConfig.from_model_dir(tmp_path)


def test_config_missing_raises(tmp_path):
    with pytest.raises(ValueError, match="does not state"):
        ImageProcessorConfig.from_model_dir(tmp_path)


# ----------------------------------------------------------------------------------------------
# transformers' PIL processor: where it agrees and where (and why) it differs


def hf_processor(patch: int):
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    return PixtralImageProcessorPil(
        patch_size={"height": patch, "width": patch},
        size={"longest_edge": 1540},
        image_mean=list(mc_image.DATASET_MEAN),
        image_std=list(mc_image.DATASET_STD),
    )


def hf_grid(width: int, height: int, patch: int) -> tuple[int, int]:
    from transformers.models.pixtral import image_processing_pil_pixtral as hf

    shape_only = np.broadcast_to(np.uint8(0), (3, height, width))  # no pixel memory
    out_h, out_w = hf.get_resize_output_image_size(
        shape_only, (1540, 1540), (patch, patch), "channels_first"
    )
    return out_h // patch, out_w // patch


@settings(max_examples=500, deadline=None)
@given(width=st.integers(1, 20_000), height=st.integers(1, 20_000))
@example(width=1541, height=1000)
@example(width=1, height=1541)
def test_grid_vs_transformers(width, height):
    """transformers floors the scaled-down sides where mistral-common rounds (half to even) and
    clamps to 1 pixel, so the grids differ exactly when that crosses a multiple of 28 (or floors
    a thin side to 0: a zero-width grid). (With 14, the patch size its
    image processor reads from preprocessor_config.json, it would also round up to 14s: only
    PixtralProcessor passes patch*merge = 28.)"""
    ratio = max(width / 1540, height / 1540)

    def bucket(side, rounding, least):
        side = max(rounding(side / ratio), least) if ratio > 1 else side
        return (side - 1) // 28 + 1

    same = all(bucket(s, math.floor, 0) == bucket(s, round, 1) for s in (width, height))
    ours = image_grid(width, height, ImageProcessorConfig())
    assert (hf_grid(width, height, 28) == ours) == same


def test_transformers_with_patch_14_rounds_to_14():
    assert image_grid(517, 333, ImageProcessorConfig()) == (12, 19)  # 336 x 532 pixels
    assert hf_grid(517, 333, 14) == (24, 37)  # 336 x 518 pixels: 37 is odd, not mergeable


@pytest.mark.parametrize(("width", "height"), [(300, 200), (97, 203), (2000, 1200)])
def test_pixels_vs_transformers_on_smooth_images(width, height):
    """On smooth content PIL's bicubic (a=-0.5, antialiased) and OpenCV's (a=-0.75, none) nearly
    agree; on noise they do not (antialiasing averages it away), so only smooth images compare."""
    rng = np.random.default_rng()
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    planes = [127 + 100 * np.sin(xs / width * 3 + ys / height * 2 + p) for p in phase]
    image = Image.fromarray(np.stack(planes, -1).round().astype(np.uint8))
    ours = preprocess_image(image, ImageProcessorConfig()).pixel_values.numpy()
    theirs = hf_processor(28)(images=[image], return_tensors="np")["pixel_values"][0]
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() < 5e-2


def test_transparency_composited_on_white_like_transformers():
    """mistral-common composites alpha over white, and so does transformers 5's convert_to_rgb;
    a plain convert("RGB") would keep the red hidden under the transparent pixels."""
    image = Image.new("RGBA", (28, 28), (255, 0, 0, 0))
    ours = preprocess_image(image, ImageProcessorConfig()).pixel_values
    theirs = hf_processor(28)(images=[image], return_tensors="np")["pixel_values"][0]
    white = (1 - torch.tensor(mc_image.DATASET_MEAN)) / torch.tensor(mc_image.DATASET_STD)
    assert torch.allclose(ours[:, 0, 0], white, atol=1e-5)
    assert np.abs(theirs - ours.numpy()).max() < 1e-2
