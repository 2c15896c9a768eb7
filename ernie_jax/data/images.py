"""Image and video-frame preprocessing for the ViT (as transformers'
ernie4_5_vl_moe image processor does it), in numpy + Pillow.

decode -> RGB -> smart resize (both sides multiples of patch * merge = 28, pixel count within
[min_pixels, max_pixels], aspect ratio kept) -> bicubic resize -> scale to [0, 1] -> CLIP mean/std
-> patches [n, C * 14 * 14] ordered by 2x2 merge windows (the order the ViT and adapter expect).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

from ernie_jax.paths import as_path, is_remote

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
_RGB_MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "CMYK", "YCbCr")


class ImageError(ValueError):
    """An image that cannot be used; the message says why (the pipeline skips and counts it)."""


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 6177
) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, h*w in [min_pixels, max_pixels], aspect ratio kept
    (the rule ERNIE-VL / Qwen2-VL processors use)."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_rgb(path: str, min_side: int = 1):
    """Decode PNG/JPEG/... into an RGB PIL image; ImageError for unreadable, odd-mode or tiny ones."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(as_path(path).read_bytes()) if is_remote(path) else path) as im:
            im.load()
            if im.mode not in _RGB_MODES:
                raise ImageError(f"unsupported channel layout {im.mode!r}")
            if min(im.size) < min_side:
                raise ImageError(f"{im.size[0]}x{im.size[1]} is below the minimum side {min_side}")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot decode ({e})") from None


def patchify(pixels: np.ndarray, patch: int = 14, merge: int = 2) -> np.ndarray:
    """[T, H, W, C] float -> [T * (H/p) * (W/p), C*p*p]; within a frame, 2x2 merge windows row-major,
    the four patches of a window row-major, each patch flattened channel-first."""
    t, h, w, c = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(t, gh // merge, merge, patch, gw // merge, merge, patch, c)
    x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # t, wh, ww, mh, mw, c, ph, pw
    return np.ascontiguousarray(x.reshape(t * gh * gw, c * patch * patch))


def preprocess_frames(
    images: Sequence,
    *,
    patch: int = 14,
    merge: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 6177,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """PIL RGB frames (one for an image) -> (patches [t*gh*gw, 3*p*p] float32, grid (t, gh, gw)).
    All frames take the first frame's target size."""
    from PIL import Image

    w0, h0 = images[0].size
    h, w = smart_resize(h0, w0, patch * merge, min_pixels, max_pixels)
    arr = (
        np.stack([np.asarray(im.resize((w, h), Image.Resampling.BICUBIC), np.float32) for im in images])
        / 255.0
    )
    arr = (arr - CLIP_MEAN) / CLIP_STD
    return patchify(arr, patch, merge), (len(images), h // patch, w // patch)


def sample_frames(num_frames: int, max_frames: int) -> list[int]:
    """Uniformly spaced frame indices, an even count (the adapter pairs frames), at most max_frames;
    a single frame is repeated to make a pair."""
    n = min(num_frames, max_frames)
    n = max(2, n - n % 2)
    return [min(num_frames - 1, int(i)) for i in np.linspace(0, num_frames - 1, n).round()]
