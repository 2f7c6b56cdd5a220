"""CREMA-D and Kinetics-Sounds in the official preprocessing layout.

    DATA_ROOT/
      train.csv, test.csv          rows ``name,LABEL`` (UTF-8, a BOM is fine; a ``name,label`` header is skipped)
      AudioWAV/<name>.wav          WAV (integer PCM or float), any rate and channel count
      Image-01-FPS/<name>/*.jpg    the clip's frames, in name order (1 frame per second)
      classes.txt                  Kinetics-Sounds only, optional: one class name per line

``--audio-root``, ``--visual-root``, ``--train-csv``, ``--test-csv`` (and ``--classes``) override
each path. CREMA-D's labels are its six emotion codes ``NEU HAP SAD FEA DIS ANG`` (indices 0-5, the
released code's order). Kinetics-Sounds has 31 classes; its label is the last column of a row,
either a class index 0-30 (the released ``my_train.txt`` style, ``name,10,4`` -> class 4) or a
class name: names index into ``classes.txt`` (line i = class i) when it exists, else into the
sorted names found in the two CSVs.

Every row is checked when the index is built (known label, WAV header readable, at least one
frame), so a broken data root fails before training with an ``AVDataError`` that names the file
(the released loader silently drops rows whose files are missing; ``skip_missing=True`` does that
too, and says how many). A file that only turns out to be broken when it is decoded inside a
DataLoader worker comes back as a ``LoadFailure`` and is raised in the main process by
``raise_failures``, again naming the file, not as a worker traceback.
"""

from __future__ import annotations

import csv
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from .audio import AudioFormatError, load_spectrogram
from .wav import WavError, wav_format

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
KS_NUM_CLASSES = 31
DATASETS = ("cremad", "ks")
FRAME_SUFFIXES = (".jpg", ".jpeg")
HEADER_NAMES = ("name", "file", "filename", "clip", "id")
HEADER_LABELS = ("label", "class", "emotion", "category")


class AVDataError(ValueError):
    """The data set is unusable; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class Layout:
    """Where a data set's files are."""

    dataset: str
    train_csv: Path
    test_csv: Path
    audio_root: Path
    visual_root: Path
    classes_file: Optional[Path] = None

    @classmethod
    def resolve(
        cls,
        dataset: str,
        data_root: Union[str, Path, None],
        *,
        audio_root: Union[str, Path, None] = None,
        visual_root: Union[str, Path, None] = None,
        train_csv: Union[str, Path, None] = None,
        test_csv: Union[str, Path, None] = None,
        classes_file: Union[str, Path, None] = None,
    ) -> "Layout":
        if dataset not in DATASETS:
            raise AVDataError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
        root = Path(data_root) if data_root is not None else None

        def pick(given: Union[str, Path, None], default: str, flag: str) -> Path:
            if given is not None:
                return Path(given)
            if root is None:
                raise AVDataError(f"give --data-root or {flag}")
            return root / default

        classes = Path(classes_file) if classes_file else (root / "classes.txt" if root is not None else None)
        return cls(
            dataset=dataset,
            train_csv=pick(train_csv, "train.csv", "--train-csv"),
            test_csv=pick(test_csv, "test.csv", "--test-csv"),
            audio_root=pick(audio_root, "AudioWAV", "--audio-root"),
            visual_root=pick(visual_root, "Image-01-FPS", "--visual-root"),
            classes_file=classes if dataset == "ks" else None,
        )


@dataclass(frozen=True)
class Clip:
    name: str
    label: int
    wav: Path
    frames: tuple[Path, ...]


@dataclass(frozen=True)
class LoadFailure:
    """A sample that could not be decoded (returned by a worker instead of raising there)."""

    path: str
    reason: str


def read_rows(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, name, label)`` of every non-empty row; the label is the last column."""
    if not path.is_file():
        raise AVDataError(f"{path}: the CSV file does not exist")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if len(cells) < 2 or not cells[0] or not cells[-1]:
                raise AVDataError(f"{path}:{line}: expected `name,LABEL`, got {','.join(row)!r}")
            if not rows and cells[0].lower() in HEADER_NAMES and cells[-1].lower() in HEADER_LABELS:
                continue  # a header line (the released CSVs have none)
            rows.append((line, cells[0], cells[-1]))
    if not rows:
        raise AVDataError(f"{path}: no rows")
    return rows


def class_names(layout: Layout) -> tuple[str, ...]:
    """The class list, index = class id (see the module docstring)."""
    if layout.dataset == "cremad":
        return CREMAD_CLASSES
    if layout.classes_file is not None and layout.classes_file.is_file():
        names = tuple(n.strip() for n in layout.classes_file.read_text(encoding="utf-8-sig").splitlines() if n.strip())
        if len(names) != KS_NUM_CLASSES or len(set(names)) != len(names):
            raise AVDataError(f"{layout.classes_file}: expected {KS_NUM_CLASSES} distinct class names, found {len(names)}")
        return names
    labels = {label for csv_path in (layout.train_csv, layout.test_csv) for _, _, label in read_rows(csv_path)}
    if all(label.isdigit() for label in labels):
        return tuple(str(i) for i in range(KS_NUM_CLASSES))
    names = tuple(sorted(label for label in labels if not label.isdigit()))
    if len(names) > KS_NUM_CLASSES:
        raise AVDataError(
            f"{layout.train_csv}, {layout.test_csv}: {len(names)} distinct class names, Kinetics-Sounds has {KS_NUM_CLASSES}"
        )
    return names


def label_index(label: str, classes: Sequence[str], dataset: str) -> Optional[int]:
    if dataset == "ks" and label.isdigit():
        i = int(label)
        return i if i < KS_NUM_CLASSES else None
    return list(classes).index(label) if label in classes else None


def check_wav_header(path: Path) -> Optional[str]:
    """None if the WAV header is readable, else why not (the samples are decoded later)."""
    try:
        if wav_format(path).frames == 0:
            return "the WAV file holds no samples"
    except (WavError, OSError, struct.error) as exc:
        return f"not a WAV file this loader can read: {exc}"
    return None


def read_index(layout: Layout, split: str, classes: Sequence[str], *, skip_missing: bool = False) -> list[Clip]:
    """The clips of ``split`` ("train" or "test"), every row checked (see the module docstring)."""
    csv_path = layout.train_csv if split == "train" else layout.test_csv
    clips: list[Clip] = []
    skipped = 0
    for line, name, label in read_rows(csv_path):
        idx = label_index(label, classes, layout.dataset)
        if idx is None:
            known = f"0-{KS_NUM_CLASSES - 1} or {' '.join(classes)}" if layout.dataset == "ks" else " ".join(classes)
            raise AVDataError(f"{csv_path}:{line}: unknown label {label!r} for {name!r} (known: {known})")
        wav = layout.audio_root / f"{name}.wav"
        frame_dir = layout.visual_root / name
        missing = wav if not wav.is_file() else (frame_dir if not frame_dir.is_dir() else None)
        if missing is not None:
            if skip_missing:
                skipped += 1
                continue
            raise AVDataError(f"{missing}: missing (row {line} of {csv_path}; --skip-missing drops such rows)")
        frames = tuple(sorted(p for p in frame_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES))
        if not frames:
            raise AVDataError(f"{frame_dir}: no .jpg frames (row {line} of {csv_path})")
        problem = check_wav_header(wav)
        if problem is not None:
            raise AVDataError(f"{wav}: {problem}")
        clips.append(Clip(name, idx, wav, frames))
    if skipped:
        print(f"{csv_path}: skipped {skipped} row(s) whose WAV or frame folder is missing", flush=True)
    if not clips:
        raise AVDataError(f"{csv_path}: no usable rows")
    return clips


class AVDataset(Dataset):
    """``(spectrogram [1, 257, 188], frames [3, fps, size, size], label)`` per clip, or a
    ``LoadFailure`` for a file that cannot be decoded."""

    def __init__(self, clips: Sequence[Clip], fps: int, image_size: int, train: bool) -> None:
        self.clips = list(clips)
        self.fps, self.image_size, self.train = fps, image_size, train

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Union[tuple[Tensor, Tensor, int], LoadFailure]:
        from .frames import load_clip  # Pillow only where frames are decoded

        clip = self.clips[i]
        try:
            spec = load_spectrogram(clip.wav)
        except (AudioFormatError, OSError) as exc:
            return LoadFailure(str(clip.wav), str(exc))
        try:
            frames = load_clip(clip.frames, self.fps, self.image_size, self.train)
        except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
            return LoadFailure(str(clip.frames), f"cannot decode a frame ({exc})")
        return spec, frames, clip.label


def collate(batch: list[Any]) -> Any:
    """``default_collate``, except that a batch with a failed sample becomes that failure."""
    for item in batch:
        if isinstance(item, LoadFailure):
            return item
    return default_collate(batch)


def raise_failures(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """In the training loop: turns a ``LoadFailure`` into an ``AVDataError`` naming the file."""
    if isinstance(batch, LoadFailure):
        raise AVDataError(f"{batch.path}: {batch.reason}")
    return batch


@dataclass(frozen=True)
class AVData:
    """Both splits of a data set, ready for DataLoaders."""

    layout: Layout
    classes: tuple[str, ...]
    train: AVDataset
    test: AVDataset

    @property
    def num_classes(self) -> int:
        return KS_NUM_CLASSES if self.layout.dataset == "ks" else len(self.classes)


def load_data(layout: Layout, fps: int = 3, image_size: int = 224, *, skip_missing: bool = False) -> AVData:
    classes = class_names(layout)
    return AVData(
        layout,
        classes,
        AVDataset(read_index(layout, "train", classes, skip_missing=skip_missing), fps, image_size, train=True),
        AVDataset(read_index(layout, "test", classes, skip_missing=skip_missing), fps, image_size, train=False),
    )


def describe(data: AVData) -> str:
    counts = torch.bincount(torch.tensor([c.label for c in data.train.clips]), minlength=data.num_classes)
    return (
        f"{data.layout.dataset}: {len(data.train)} train / {len(data.test)} test clips, {data.num_classes} classes, "
        f"train clips per class min {int(counts.min())} max {int(counts.max())}"
    )
