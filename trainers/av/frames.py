"""Frame preprocessing of the official loaders, with Pillow and torch (no torchvision).

Train: ``RandomResizedCrop(size)`` (area 8-100% of the frame, aspect 3/4-4/3, ten tries, then a
centre crop) + horizontal flip with probability 1/2; test: ``Resize((size, size))``. Both
resample with Pillow's bilinear filter (what torchvision does for PIL images) and end with
``ToTensor`` + ImageNet normalisation. Randomness comes from torch's generator, which the
DataLoader seeds differently in every worker.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_box(
    width: int, height: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: Optional[torch.Generator] = None,
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a random crop, as torchvision's ``RandomResizedCrop``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: the largest centred crop inside the ratio range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def to_normalized_tensor(img: Image.Image) -> Tensor:
    """``[3, H, W]`` float32: ``ToTensor`` (/255) then ImageNet mean/std."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def transform_frame(img: Image.Image, size: int, train: bool, generator: Optional[torch.Generator] = None) -> Tensor:
    """One RGB frame -> ``[3, size, size]``."""
    if train:
        box = random_resized_box(*img.size, generator=generator)
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if torch.rand(1, generator=generator).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return to_normalized_tensor(img)


def pick_frames(n_available: int, fps: int, train: bool, generator: Optional[torch.Generator] = None) -> list[int]:
    """Which of a clip's (name-sorted) frames to use: in training ``fps`` distinct random ones in
    temporal order (the released loader's ``np.random.choice(..., replace=False)`` + sort); at
    test time evenly spaced ones, so evaluation is deterministic."""
    k = min(fps, n_available)
    if train:
        return sorted(torch.randperm(n_available, generator=generator)[:k].tolist())
    return [int((i + 0.5) * n_available / k) for i in range(k)]


def load_clip(
    frame_paths: Sequence[Union[str, Path]], fps: int, size: int, train: bool, generator: Optional[torch.Generator] = None
) -> Tensor:
    """``[3, fps, size, size]``; a clip with fewer than ``fps`` frames is zero-padded at the end
    (as the released loader does)."""
    out = torch.zeros(fps, 3, size, size)
    for i, k in enumerate(pick_frames(len(frame_paths), fps, train, generator)):
        with Image.open(frame_paths[k]) as img:
            out[i] = transform_frame(img.convert("RGB"), size, train, generator)
    return out.permute(1, 0, 2, 3).contiguous()
