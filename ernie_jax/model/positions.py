"""3D position ids (t, h, w) for interleaved text / image / video sequences (host side, numpy).

Text tokens count up by one on all three axes. A vision item of T' x H' x W' merged tokens that
starts at text position s gets t = s + frame group, h = s + row, w = s + column (PaddlePaddle/ERNIE
ernie/modeling_moe_vl.py). The next text position after the item is where ERNIE's reference
(Paddle, vLLM ernie45_vl.py) and transformers differ for videos: ERNIE continues at max(all ids) + 1
= s + max(T', H', W'); transformers at s + max(H', W'), ignoring time. `video_advance` picks one;
the default follows ERNIE's reference. For images (T' = 1) both agree.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Literal

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def sample_position_ids(
    token_types: np.ndarray,
    grids: Iterator[np.ndarray],
    spatial_merge: int = 2,
    temporal_merge: int = 2,
    start: int = 0,
    video_advance: Literal["ernie", "transformers"] = "ernie",
) -> np.ndarray:
    """token_types [S] (0 text, 1 image, 2 video placeholders) -> positions [S, 3].

    `grids` yields the (t, h, w) patch grid of each vision item in order of appearance; each
    maximal run of one vision type is one item.
    """
    out, pos = [], start
    for kind, run in itertools.groupby(np.asarray(token_types).tolist()):
        n = len(list(run))
        if kind == TEXT:
            out.append(np.repeat((pos + np.arange(n))[:, None], 3, axis=1))
            pos += n
            continue
        t, h, w = (int(v) for v in next(grids))
        tt = t // temporal_merge if kind == VIDEO else 1
        hh, ww = h // spatial_merge, w // spatial_merge
        if tt * hh * ww != n:
            raise ValueError(
                f"a {'video' if kind == VIDEO else 'image'} run of {n} placeholder tokens does not "
                f"match its grid {(t, h, w)} ({tt * hh * ww} tokens after merging)"
            )
        g = np.stack(np.meshgrid(np.arange(tt), np.arange(hh), np.arange(ww), indexing="ij"), -1).reshape(
            -1, 3
        )
        out.append(g + pos)
        if kind == VIDEO and video_advance == "ernie":
            pos += max(tt, hh, ww)
        else:
            pos += max(hh, ww)
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 3), np.int32)


def position_ids(
    mm_token_type_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    spatial_merge: int = 2,
    temporal_merge: int = 2,
    video_advance: Literal["ernie", "transformers"] = "ernie",
) -> np.ndarray:
    """Batch version: mm_token_type_ids [B, S] -> positions [B, S, 3]. Items are taken in batch-row
    order from `image_grid_thw` / `video_grid_thw`; masked (padding) tokens get position 0."""
    types = np.asarray(mm_token_type_ids)
    b, s = types.shape
    keep = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grid_iters = {
        IMAGE: iter(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else iter(()),
        VIDEO: iter(np.asarray(video_grid_thw).reshape(-1, 3)) if video_grid_thw is not None else iter(()),
    }
    out = np.zeros((b, s, 3), np.int32)
    for i in range(b):
        row = types[i][keep[i]]
        grids = _interleave(row, grid_iters)
        out[i, keep[i]] = sample_position_ids(
            row, grids, spatial_merge, temporal_merge, video_advance=video_advance
        )
    return out


def _interleave(types: np.ndarray, iters: dict) -> Iterator[np.ndarray]:
    for kind, _ in itertools.groupby(types.tolist()):
        if kind != TEXT:
            try:
                yield next(iters[kind])
            except StopIteration:
                name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                raise ValueError(
                    f"more {'image' if kind == IMAGE else 'video'} runs in the tokens than rows in "
                    f"{name}; pass one grid row per item"
                ) from None
