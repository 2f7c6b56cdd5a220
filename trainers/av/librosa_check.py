"""How far this project's torch audio pipeline is from the released code's librosa one.

    python3 -m venv /tmp/lr && /tmp/lr/bin/pip install librosa==0.11.0
    espeak-ng -w /tmp/speech.wav "It's eleven o'clock. I think I have seen this before."
    python -m trainers.av.librosa_check /tmp/speech.wav --copies 16000 48000 --librosa-python /tmp/lr/bin/python

librosa is not a dependency of the project: its half runs in ``--librosa-python`` (default: this
interpreter), which computes, per file, ``librosa.load(sr=22050)`` and the released loader's
spectrogram. ``--copies`` first writes 2.5 s 16-bit copies of each file at those rates (with soxr
in the librosa interpreter; 16 kHz mono is what CREMA-D ships, 48000 is written as stereo).
Prints, per file: the resampled waveform's SNR against librosa's, and the log-spectrogram
difference over all bins and over the bins within 40 dB of the spectrogram's peak (the rest sit
near the ``1e-7`` floor, where float rounding alone moves the log by whole units).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .audio import SAMPLE_RATE, log_spectrogram, read_wav, resample

LIBROSA_SIDE = r"""
import json, sys, wave
import numpy as np, librosa, soxr
job = json.loads(sys.argv[1])
def write(path, x, sr, channels):
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(channels); w.setsampwidth(2); w.setframerate(sr); w.writeframes(pcm.tobytes())
for src, rate, dst in job["copies"]:
    x, sr = librosa.load(src, sr=None)
    y = soxr.resample(x, sr, rate, "VHQ")[: int(2.5 * rate)]
    y = y * 0.9 / np.abs(y).max()
    if rate >= 44100:  # a stereo copy: the second channel delayed and quieter
        y = np.stack([y, 0.7 * np.roll(y, 100)], 1).reshape(-1)
    write(dst, y, rate, 2 if rate >= 44100 else 1)
for src, out in job["refs"]:
    s, _ = librosa.load(src, sr=22050)                 # the released CramedDataset.__getitem__
    r = np.tile(s, 3)[: 22050 * 3]
    r[r > 1.0] = 1.0
    r[r < -1.0] = -1.0
    spec = np.log(np.abs(librosa.stft(r, n_fft=512, hop_length=353)) + 1e-7)
    np.savez(out, wave=s, spec=spec)
print(json.dumps({"librosa": librosa.__version__, "soxr": soxr.__version__}))
"""


def compare(path: Path, ref: np.lib.npyio.NpzFile) -> dict[str, float]:
    x, rate = read_wav(path)
    ours = resample(x, rate, SAMPLE_RATE).numpy()
    wave_ref = ref["wave"]
    if ours.shape != wave_ref.shape:
        raise SystemExit(f"{path}: {ours.size} resampled samples here, {wave_ref.size} from librosa")
    err = ours - wave_ref
    spec = log_spectrogram(x, rate).numpy()
    diff = np.abs(spec - ref["spec"])
    loud = ref["spec"] > ref["spec"].max() - np.log(100.0)  # within 40 dB of the peak
    return {
        "rate": rate,
        "snr_db": float(10 * np.log10((wave_ref**2).sum() / max(float((err**2).sum()), 1e-30))),
        "wave_max_abs": float(np.abs(err).max()),
        "spec_mean_abs": float(diff.mean()),
        "spec_median_abs": float(np.median(diff)),
        "spec_max_abs": float(diff.max()),
        "loud_fraction": float(loud.mean()),
        "loud_mean_abs": float(diff[loud].mean()),
        "loud_max_abs": float(diff[loud].max()),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.av.librosa_check", description=__doc__.split("\n\n")[0])
    p.add_argument("wavs", nargs="+", type=Path)
    p.add_argument("--copies", nargs="*", type=int, default=[], help="also check 2.5 s copies at these sample rates")
    p.add_argument("--librosa-python", default=sys.executable, help="an interpreter with librosa installed")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = list(args.wavs)
        copies = []
        for src in args.wavs:
            for rate in args.copies:
                dst = Path(tmp) / f"{src.stem}_{rate}.wav"
                copies.append((str(src), rate, str(dst)))
                files.append(dst)
        refs = [(str(f), str(Path(tmp) / f"ref{i}.npz")) for i, f in enumerate(files)]
        done = subprocess.run(
            [args.librosa_python, "-c", LIBROSA_SIDE, json.dumps({"copies": copies, "refs": refs})],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"the librosa side failed ({args.librosa_python}):\n{done.stderr.strip()}")
        versions = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"reference: librosa {versions['librosa']} (soxr {versions['soxr']}); here: torch resample + torch.stft")
        for f, (_, out) in zip(files, refs):
            with np.load(out) as ref:
                r = compare(f, ref)
            print(
                f"{f.name}: {r['rate']} Hz -> {SAMPLE_RATE} Hz: waveform SNR {r['snr_db']:.1f} dB (max |diff| {r['wave_max_abs']:.1e}); "
                f"log-spectrogram |diff| mean {r['spec_mean_abs']:.1e}, median {r['spec_median_abs']:.1e}, max {r['spec_max_abs']:.2f}; "
                f"bins within 40 dB of the peak ({100 * r['loud_fraction']:.0f}%): mean {r['loud_mean_abs']:.1e}, max {r['loud_max_abs']:.1e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
