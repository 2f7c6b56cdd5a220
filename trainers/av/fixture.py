"""Writes a tiny CREMA-D-layout data set whose class is recoverable from either modality.

    python -m trainers.av.fixture DIR [--train-per-class 4] [--test-per-class 2] [--seed 0]

Per clip, CREMA-D style (``1001_DFA_ANG_XX``): ``AudioWAV/<name>.wav`` - 16 kHz 16-bit mono PCM
(as CREMA-D), 1.2-2.8 s of a class-specific tone (a fundamental and two harmonics, with noise)
- and ``Image-01-FPS/<name>/00000.jpg ...`` - two or three 96x72 frames of a class-specific
colour with noise and a moving bright square. A colour survives any crop and flip, a tone any
resampling, so each modality alone determines the class. ``train.csv``/``test.csv`` list
``name,LABEL``. For tests and for checking the trainer end to end; it says nothing about accuracy
on real data.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import wave
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .data import CREMAD_CLASSES

RATE = 16_000
FRAME_SIZE = (96, 72)
TONES_HZ = (220.0, 330.0, 440.0, 587.0, 740.0, 880.0)
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200), (40, 200, 200))


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def tone(label: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    f = TONES_HZ[label % len(TONES_HZ)] * (1.0 + 0.01 * rng.standard_normal())
    x = sum(a * np.sin(2 * math.pi * f * k * t + rng.uniform(0, 2 * math.pi)) for k, a in ((1, 0.5), (2, 0.2), (3, 0.1)))
    envelope = np.minimum(1.0, np.minimum(t, t[-1] - t) * 20.0)  # 50 ms fade in and out
    return x * envelope + 0.02 * rng.standard_normal(t.size)


def frame(label: int, index: int, rng: np.random.Generator) -> np.ndarray:
    w, h = FRAME_SIZE
    img = np.array(COLOURS[label % len(COLOURS)], dtype=np.float64)[None, None, :] + 25.0 * rng.standard_normal((h, w, 3))
    x0 = (10 + 17 * index) % (w - 16)
    img[20:36, x0 : x0 + 16] = 255.0
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(root: Path, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0, classes: Sequence[str] = CREMAD_CLASSES) -> dict[str, int]:
    """Writes the data set under ``root``; returns the number of clips per split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    (root / "Image-01-FPS").mkdir(parents=True, exist_ok=True)
    counts = {}
    actor = 1001
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for i in range(per_class):
            for label, code in enumerate(classes):
                name = f"{actor}_S{i:02d}_{code}_XX"
                actor += 1
                write_wav(root / "AudioWAV" / f"{name}.wav", tone(label, rng.uniform(1.2, 2.8), rng))
                frames = root / "Image-01-FPS" / name
                frames.mkdir(exist_ok=True)
                for k in range(int(rng.integers(2, 4))):
                    Image.fromarray(frame(label, k, rng)).save(frames / f"{k:05d}.jpg", quality=90)
                rows.append((name, code))
        order = rng.permutation(len(rows))
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows[j] for j in order)
        counts[split] = len(rows)
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.av.fixture", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="directory to write (created)")
    p.add_argument("--train-per-class", type=int, default=4)
    p.add_argument("--test-per-class", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train_per_class < 1 or args.test_per_class < 1:
        p.error("--train-per-class and --test-per-class must be >= 1")
    counts = generate(args.root, args.train_per_class, args.test_per_class, args.seed)
    print(f"{args.root}: CREMA-D layout, {counts['train']} train and {counts['test']} test clips, {len(CREMAD_CLASSES)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
