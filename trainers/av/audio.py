"""Audio preprocessing of the official InfoReg/OGM-GE CREMA-D loader, in torch (no librosa).

The released ``CramedDataset`` does ``librosa.load(wav, sr=22050)``, tiles the clip to 3 s, clips
it to [-1, 1], ``librosa.stft(n_fft=512, hop_length=353)`` and ``log(|S| + 1e-7)``: a
``257 x 188`` log-magnitude spectrogram. Here: WAV via ``trainers/av/wav.py`` (integer PCM, what
CREMA-D ships, or float), a windowed-sinc resampler (Kaiser window) and ``torch.stft`` with librosa's
defaults (centred frames, zero padding, periodic Hann window). How far this is from librosa was
measured and is in docs/integrations.md ("Audio-visual trainer").
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .wav import WavError, read_samples

SAMPLE_RATE = 22_050
CLIP_SECONDS = 3
N_FFT = 512
HOP = 353
LOG_EPS = 1e-7
SPEC_SHAPE = (N_FFT // 2 + 1, 1 + SAMPLE_RATE * CLIP_SECONDS // HOP)  # (257, 188)


class AudioFormatError(ValueError):
    """The file is not a WAV this loader can decode (the message says why)."""


def read_wav(path: Union[str, Path]) -> tuple[Tensor, int]:
    """Mono float32 samples and the sample rate of a WAV file (integer PCM or float, see
    ``trainers/av/wav.py``).

    Channels are averaged (librosa's ``to_mono``); n-bit integers are divided by 2^(n-1), as
    libsndfile does, so the values equal librosa's before resampling.
    """
    try:
        x, rate = read_samples(path)
    except WavError as exc:
        raise AudioFormatError(f"not a WAV file this loader can read: {exc}") from exc
    return torch.from_numpy(x.mean(axis=1, dtype=np.float32)), rate


@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, zeros: int, rolloff: float, beta: float) -> tuple[Tensor, int]:
    """Polyphase low-pass kernels ``[new, 1, taps]`` for resampling ``orig -> new`` (both already
    divided by their gcd) and the half-width in input samples.

    Output sample ``j`` of a block of ``new`` lies at input position ``j * orig / new``; its
    filter is a sinc with cut-off ``rolloff * min(orig, new) / 2`` (in block units), truncated to
    ``zeros`` zero crossings and tapered by a Kaiser window.
    """
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # input offsets, in blocks
    phase = -torch.arange(new, dtype=torch.float64)[:, None] / new
    t = (phase + taps[None, :]) * cutoff  # in units of zero crossings
    t = t.clamp(-zeros, zeros)
    window = torch.i0(beta * torch.sqrt(1 - (t / zeros) ** 2)) / torch.i0(torch.tensor(beta, dtype=torch.float64))
    kernel = torch.special.sinc(t) * window * (cutoff / orig)
    return kernel.to(torch.float32).unsqueeze(1), width


def resample(x: Tensor, orig_rate: int, new_rate: int, *, zeros: int = 64, rolloff: float = 0.96, beta: float = 10.0) -> Tensor:
    """Band-limited resampling of a 1-D signal (windowed sinc, polyphase ``conv1d``).

    The output has ``ceil(len(x) * new_rate / orig_rate)`` samples, like librosa's. Defaults
    (64 zero crossings, cut-off at 96% of the lower Nyquist frequency, Kaiser beta 10) were
    chosen to come closest to librosa's default ``soxr_hq`` on speech (see docs/integrations.md).
    """
    if orig_rate == new_rate:
        return x
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernel, width = _sinc_kernel(orig, new, zeros, rolloff, beta)
    n = x.shape[-1]
    padded = F.pad(x.reshape(1, 1, n), (width, width + orig))
    out = F.conv1d(padded, kernel.to(x.device), stride=orig)  # [1, new, blocks]
    out = out.transpose(1, 2).reshape(-1)
    return out[: math.ceil(new * n / orig)]


def log_spectrogram(samples: Tensor, rate: int) -> Tensor:
    """``[257, 188]`` float32: resampled to 22,050 Hz, tiled to 3 s, clipped to [-1, 1],
    STFT (n_fft 512, hop 353, Hann, centred), ``log(|S| + 1e-7)``.

    The released code tiles the clip three times and cuts at 3 s; clips shorter than 1 s are
    tiled as often as needed instead, so every spectrogram has 188 frames.
    """
    x = resample(samples.to(torch.float32), rate, SAMPLE_RATE)
    length = SAMPLE_RATE * CLIP_SECONDS
    if x.numel() == 0:
        raise AudioFormatError("no samples")
    x = x.repeat(max(3, math.ceil(length / x.numel())))[:length].clamp(-1.0, 1.0)
    spec = torch.stft(
        x, N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="constant", return_complex=True
    )
    return torch.log(spec.abs() + LOG_EPS)


def load_spectrogram(path: Union[str, Path]) -> Tensor:
    """The model's audio input for one WAV file: ``[1, 257, 188]`` float32."""
    samples, rate = read_wav(path)
    return log_spectrogram(samples, rate).unsqueeze(0)
