"""WAV files: integer PCM (8/16/24/32 bit), IEEE float (32/64 bit) and WAVE_FORMAT_EXTENSIBLE.

The stdlib ``wave`` module (Python 3.11) reads only plain integer PCM, but WAV files written by
common tools are also float (``scipy.io.wavfile`` with float data, ``soundfile`` ``FLOAT``) or
EXTENSIBLE (24-bit and multichannel files). The decoding matches libsndfile's, which librosa
reads through: n-bit integers divided by 2^(n-1), floats as stored. Strict on purpose: a data
chunk shorter than its header says is an error (the file was cut), not silently fewer samples.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np

PCM, FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE


class WavError(ValueError):
    """Not a WAV file this module can decode (the message says why)."""


@dataclass(frozen=True)
class WavFormat:
    encoding: int  # PCM or FLOAT (EXTENSIBLE resolved to its sub-format)
    channels: int
    rate: int
    bits: int
    data_offset: int
    data_bytes: int  # as the data chunk's header declares

    @property
    def frames(self) -> int:
        return self.data_bytes // (self.channels * self.bits // 8)


def _chunks(f: BinaryIO) -> Iterator[tuple[bytes, int, int]]:
    """``(id, size, offset of the payload)`` of each chunk after the RIFF/WAVE header."""
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        raise WavError("not a RIFF/WAVE file")
    while True:
        h = f.read(8)
        if len(h) < 8:
            return
        cid, size = h[:4], struct.unpack("<I", h[4:])[0]
        offset = f.tell()
        yield cid, size, offset
        f.seek(offset + size + (size & 1))


def read_format(f: BinaryIO) -> WavFormat:
    """Parses the header up to the data chunk (the samples are not read)."""
    fmt = None
    for cid, size, offset in _chunks(f):
        if cid == b"fmt ":
            raw = f.read(size)
            if len(raw) < 16:
                raise WavError("the fmt chunk is too short")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", raw[:16])
            if tag == EXTENSIBLE:
                if len(raw) < 26:
                    raise WavError("WAVE_FORMAT_EXTENSIBLE without its sub-format")
                tag = struct.unpack("<H", raw[24:26])[0]  # the sub-format GUID starts with the format tag
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise WavError("the data chunk comes before the fmt chunk")
            tag, channels, rate, bits = fmt
            if tag not in (PCM, FLOAT):
                raise WavError(f"unsupported encoding 0x{tag:04x} (integer PCM and IEEE float are)")
            if (tag == PCM and bits not in (8, 16, 24, 32)) or (tag == FLOAT and bits not in (32, 64)):
                raise WavError(f"unsupported sample size: {bits}-bit {'float' if tag == FLOAT else 'PCM'}")
            if channels < 1 or rate < 1:
                raise WavError(f"bad header: {channels} channels at {rate} Hz")
            return WavFormat(tag, channels, rate, bits, offset, size)
    raise WavError("no data chunk" if fmt is not None else "no fmt chunk")


def wav_format(path: Union[str, Path]) -> WavFormat:
    with open(path, "rb") as f:
        return read_format(f)


def read_samples(path: Union[str, Path]) -> tuple[np.ndarray, int]:
    """``[frames, channels]`` float32 samples and the sample rate."""
    with open(path, "rb") as f:
        fmt = read_format(f)
        f.seek(fmt.data_offset)
        raw = f.read(fmt.data_bytes)
    frame_bytes = fmt.channels * fmt.bits // 8
    if len(raw) < fmt.data_bytes:
        raise WavError(f"truncated: the header promises {fmt.frames} frames, the file holds {len(raw) // frame_bytes}")
    raw = raw[: len(raw) - len(raw) % frame_bytes]
    if not raw:
        raise WavError("the WAV file holds no samples")
    if fmt.encoding == FLOAT:
        x = np.frombuffer(raw, "<f4" if fmt.bits == 32 else "<f8").astype(np.float32)
    elif fmt.bits == 8:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif fmt.bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif fmt.bits == 24:  # little-endian 3-byte integers, sign-extended through int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = (((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 8).astype(np.float32) / 8388608.0
    else:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    return x.reshape(-1, fmt.channels), fmt.rate
