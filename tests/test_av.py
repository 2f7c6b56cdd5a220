"""The audio-visual trainer: data layout and loaders, preprocessing, clear data errors, and one
epoch through a real regulator on loopback (tiny generated data set, low resolution)."""

from __future__ import annotations

import json
import math
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from regulator_client import RegulatorClient
from trainers.av import __main__ as av_cli
from trainers.av.audio import SPEC_SHAPE, load_spectrogram, log_spectrogram, read_wav, resample
from trainers.av.data import CREMAD_CLASSES, Layout, collate, load_data, raise_failures
from trainers.av.fixture import generate, write_wav
from trainers.av.frames import pick_frames

pytest.importorskip("PIL", reason="frames are decoded with Pillow")


@pytest.fixture(scope="module")
def cremad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cremad")
    generate(root, train_per_class=2, test_per_class=1, seed=3)
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(root, dst)
    return dst


def csv_rows(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split(",")) for line in path.read_text().splitlines()]  # type: ignore[misc]


# -- preprocessing ----------------------------------------------------------------------------


def test_resampling_keeps_a_tone_and_the_length_librosa_gives() -> None:
    for orig in (8_000, 16_000, 44_100, 48_000):
        t = torch.arange(orig, dtype=torch.float64) / orig
        y = resample(torch.sin(2 * math.pi * 440 * t).float(), orig, 22_050)
        assert y.numel() == math.ceil(orig * 22_050 / orig)
        tt = torch.arange(y.numel(), dtype=torch.float64) / 22_050
        inner = slice(2_000, -2_000)  # away from the zero padding at both ends
        err = (y[inner].double() - torch.sin(2 * math.pi * 440 * tt[inner])).abs().max().item()
        assert err < 1e-4, (orig, err)


def test_spectrogram_shape_peak_and_tiling(tmp_path: Path) -> None:
    rate, f = 16_000, 1_000.0
    x = 0.5 * np.sin(2 * np.pi * f * np.arange(int(1.3 * rate)) / rate)
    write_wav(tmp_path / "a.wav", x, rate)
    samples, r = read_wav(tmp_path / "a.wav")
    assert r == rate and samples.numel() == x.size
    with wave.open(str(tmp_path / "a.wav")) as w:  # n-bit PCM / 2^(n-1), as libsndfile (librosa) reads it
        ints = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert np.array_equal(samples.numpy(), ints.astype(np.float32) / 32768)
    spec = load_spectrogram(tmp_path / "a.wav")
    assert spec.shape == (1, *SPEC_SHAPE) == (1, 257, 188) and spec.dtype == torch.float32
    assert int(spec[0].mean(1).argmax()) == round(f * 512 / 22_050)  # bin 23
    # a 0.3 s clip is tiled to fill 3 s (the released code's 3 tiles would leave it short)
    short = log_spectrogram(torch.from_numpy(x[: int(0.3 * rate)]).float(), rate)
    assert short.shape == SPEC_SHAPE and torch.isfinite(short).all()


def write_raw_wav(path: Path, payload: bytes, tag: int, channels: int, rate: int, bits: int, extensible: bool = False) -> None:
    """A WAV file written by hand: any encoding tag, optionally as WAVE_FORMAT_EXTENSIBLE."""
    import struct

    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:  # cbSize, valid bits, channel mask, sub-format GUID (starts with the tag)
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + bytes.fromhex("000000001000800000aa00389b71")
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_wav_encodings_decode_as_libsndfile_does(tmp_path: Path) -> None:
    """Integer PCM of 8/16/24/32 bits (n-bit / 2^(n-1)), float32/64 as stored, EXTENSIBLE
    headers; channels averaged to mono."""
    left = np.linspace(-0.5, 0.5, 101)
    stereo = np.stack([left, -left / 2], 1)
    ints24 = (stereo * 8388607).round().astype(np.int32)
    raw24 = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints24.reshape(-1))
    write_raw_wav(tmp_path / "s24.wav", raw24, 1, 2, 48_000, 24, extensible=True)
    samples, rate = read_wav(tmp_path / "s24.wav")
    assert rate == 48_000 and samples.shape == (101,)
    assert np.array_equal(samples.numpy(), (ints24.astype(np.float32) / 8388608).mean(axis=1, dtype=np.float32))
    floats = (left * 0.9).astype("<f4")
    write_raw_wav(tmp_path / "f32.wav", floats.tobytes(), 3, 1, 16_000, 32)
    assert np.array_equal(read_wav(tmp_path / "f32.wav")[0].numpy(), floats)
    write_raw_wav(tmp_path / "f64.wav", left.astype("<f8").tobytes(), 3, 1, 16_000, 64, extensible=True)
    assert np.array_equal(read_wav(tmp_path / "f64.wav")[0].numpy(), left.astype(np.float32))
    u8 = np.array([0, 64, 128, 255], dtype=np.uint8)
    write_raw_wav(tmp_path / "u8.wav", u8.tobytes(), 1, 1, 8_000, 8)
    assert read_wav(tmp_path / "u8.wav")[0].tolist() == [-1.0, -0.5, 0.0, 127 / 128]
    i32 = np.array([-(2**31), 2**30], dtype="<i4")
    write_raw_wav(tmp_path / "i32.wav", i32.tobytes(), 1, 1, 8_000, 32)
    assert read_wav(tmp_path / "i32.wav")[0].tolist() == [-1.0, 0.5]
    write_raw_wav(tmp_path / "alaw.wav", b"\x00" * 10, 6, 1, 8_000, 8)  # A-law: refused by name
    with pytest.raises(ValueError, match="unsupported encoding 0x0006"):
        read_wav(tmp_path / "alaw.wav")


def test_test_time_frames_are_deterministic_and_spread() -> None:
    assert pick_frames(3, 3, train=False) == [0, 1, 2]
    assert pick_frames(9, 3, train=False) == [1, 4, 7]
    assert pick_frames(2, 3, train=False) == [0, 1]  # fewer frames than fps: the rest stays zero
    picked = pick_frames(10, 3, train=True)
    assert len(set(picked)) == 3 and picked == sorted(picked)


# -- loaders ----------------------------------------------------------------------------------


def test_loaders_give_the_documented_shapes_and_labels(cremad: Path) -> None:
    data = load_data(Layout.resolve("cremad", cremad), fps=3, image_size=40)
    assert data.classes == CREMAD_CLASSES and data.num_classes == 6
    rows = csv_rows(cremad / "train.csv")
    assert [c.name for c in data.train.clips] == [name for name, _ in rows]
    assert [c.label for c in data.train.clips] == [CREMAD_CLASSES.index(label) for _, label in rows]
    assert len(data.train) == 12 and len(data.test) == 6
    batch = raise_failures(collate([data.train[i] for i in range(4)]))
    audio, visual, y = batch
    assert audio.shape == (4, 1, 257, 188) and visual.shape == (4, 3, 3, 40, 40) and y.dtype == torch.int64
    assert y.tolist() == [c.label for c in data.train.clips[:4]]
    # test frames: deterministic; ImageNet-normalised colour of the clip's class
    a, v1, _ = data.test[0]
    _, v2, _ = data.test[0]
    assert torch.equal(v1, v2)
    n_frames = len(data.test.clips[0].frames)
    if n_frames < 3:
        assert v1[:, n_frames:].abs().sum() == 0


def test_kinetics_sounds_labels_from_indices_names_or_a_class_file(cremad: Path, tmp_path: Path) -> None:
    root = copy_of(cremad, tmp_path)
    names = [n for n, _ in csv_rows(root / "train.csv")]
    test_names = [n for n, _ in csv_rows(root / "test.csv")]
    # the released my_train.txt style: name,<something>,<class index>
    (root / "train.csv").write_text("".join(f"{n},10,{i % 31}\n" for i, n in enumerate(names)))
    (root / "test.csv").write_text("".join(f"{n},10,30\n" for n in test_names))
    data = load_data(Layout.resolve("ks", root), fps=2, image_size=32)
    assert data.num_classes == 31 and [c.label for c in data.train.clips] == [i % 31 for i in range(len(names))]
    # class names, indexed by their sorted order ...
    (root / "train.csv").write_text("".join(f"{n},{'playing drums' if i % 2 else 'singing'}\n" for i, n in enumerate(names)))
    (root / "test.csv").write_text("".join(f"{n},singing\n" for n in test_names))
    data = load_data(Layout.resolve("ks", root), fps=2, image_size=32)
    assert data.classes == ("playing drums", "singing") and data.num_classes == 31
    assert [c.label for c in data.train.clips] == [0 if i % 2 else 1 for i in range(len(names))]
    # ... or by classes.txt
    classes = [f"class {i}" for i in range(29)] + ["singing", "playing drums"]
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    data = load_data(Layout.resolve("ks", root), fps=2, image_size=32)
    assert [c.label for c in data.train.clips] == [30 if i % 2 else 29 for i in range(len(names))]


def test_paths_can_be_overridden_one_by_one(cremad: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(cremad / "AudioWAV", elsewhere / "wav")
    (elsewhere / "t.csv").write_text("name,label\n" + (cremad / "test.csv").read_text())  # a header line is skipped
    layout = Layout.resolve("cremad", cremad, audio_root=elsewhere / "wav", test_csv=elsewhere / "t.csv")
    assert layout.visual_root == cremad / "Image-01-FPS" and layout.train_csv == cremad / "train.csv"
    data = load_data(layout, fps=1, image_size=32)
    assert data.test.clips[0].wav.parent == elsewhere / "wav"
    assert [c.name for c in data.test.clips] == [n for n, _ in csv_rows(cremad / "test.csv")]


# -- clear errors for broken data roots ------------------------------------------------------------


def run_cli(root: Path, *extra: str) -> list[str]:
    return ["--dataset", "cremad", "--data-root", str(root), "--in-process", "--epochs", "1", "--batch-size", "4",
            "--image-size", "32", "--fps", "2", "--log-every", "0", *extra]


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert av_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("python -m trainers.av: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_file_unknown_label_and_bad_wav_are_named(cremad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_of(cremad, tmp_path)
    name, _ = csv_rows(root / "train.csv")[2]
    wav = root / "AudioWAV" / f"{name}.wav"
    good = wav.read_bytes()

    wav.unlink()
    msg = cli_error(capsys, run_cli(root, "--workers", "0"))
    assert str(wav) in msg and "missing" in msg and "row 3 of" in msg
    kept = load_data(Layout.resolve("cremad", root), fps=1, image_size=32, skip_missing=True)  # the released loader's behaviour, opt-in
    assert len(kept.train) == 11 and name not in [c.name for c in kept.train.clips]

    wav.write_bytes(b"RIFF\x00\x00\x00\x00not a wav at all")
    msg = cli_error(capsys, run_cli(root, "--workers", "0"))
    assert str(wav) in msg and "not a WAV file this loader can read" in msg

    wav.write_bytes(good)
    rows = (root / "test.csv").read_text().splitlines()
    rows[1] = rows[1].rsplit(",", 1)[0] + ",JOY"
    (root / "test.csv").write_text("\n".join(rows) + "\n")
    msg = cli_error(capsys, run_cli(root, "--workers", "0"))
    assert f"{root / 'test.csv'}:2: unknown label 'JOY'" in msg and "NEU HAP SAD FEA DIS ANG" in msg


def test_a_wav_that_breaks_inside_a_worker_is_named_not_a_worker_traceback(
    cremad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The header is fine (the index check passes), the samples are cut short: the worker
    returns the failure, the main process raises it naming the file."""
    root = copy_of(cremad, tmp_path)
    name, _ = csv_rows(root / "train.csv")[0]
    wav = root / "AudioWAV" / f"{name}.wav"
    wav.write_bytes(wav.read_bytes()[:-1000])
    msg = cli_error(capsys, run_cli(root, "--workers", "1"))
    assert str(wav) in msg and "truncated" in msg


def test_a_corrupt_frame_is_named(cremad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_of(cremad, tmp_path)
    for name, _ in csv_rows(root / "train.csv"):
        for jpg in (root / "Image-01-FPS" / name).glob("*.jpg"):
            jpg.write_bytes(b"not a jpeg")
    msg = cli_error(capsys, run_cli(root, "--workers", "0"))
    assert str(root / "Image-01-FPS") in msg and "cannot decode a frame" in msg


# -- training -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_one_epoch_through_a_real_regulator(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Plumbing, kept small: 4 training clips in batches of 2, 32x32 frames (the 257x188
    spectrogram is what costs: a ResNet-18 step on it takes seconds on 2 CPU cores)."""
    generate(tmp_path / "data", train_per_class=1, test_per_class=1, seed=5)
    for split, keep in (("train", 4), ("test", 2)):  # 4 training clips, 2 test clips
        csv = tmp_path / "data" / f"{split}.csv"
        csv.write_text("".join(line + "\n" for line in csv.read_text().splitlines()[:keep]))
    out = tmp_path / "result.json"
    argv = run_cli(tmp_path / "data", "--workers", "1", "--job-id", "av-e2e", "--out", str(out), "--batch-size", "2")
    argv.remove("--in-process")
    assert av_cli.main([*argv, "--target", server.target]) == 0
    result = json.loads(out.read_text())
    assert set(result["unimodal_acc"]) == {"audio", "visual"}
    assert set(result["window_open_epochs"]) == {"audio", "visual"}
    assert 0.0 <= result["fused_acc"] <= 1.0 and result["steps"] == 2  # 4 clips, batch 2
    assert result["config"]["profile"] == "official" and result["config"]["profile_params"] == {"reference_modality": "audio"}
    err = capsys.readouterr().err
    assert "epoch   1/1" in err and "audio:Tr=" in err and "next window" in err
    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        detail = client.get_session("av-e2e", include_steps=True)
    assert list(detail.session.modalities) == ["audio", "visual"]
    steps = list(detail.steps)
    assert [s.step for s in steps] == [0, 1] and [s.count for s in steps] == [2, 2]
    # official opens every window at epoch 0 and regulates whichever modality scores higher
    assert all(any(m.factors.proximal > 0 for m in s.modalities) for s in steps)
    assert result["window_open_epochs"] == {"audio": 1, "visual": 1}
    assert all(t > 0 for t in (result["fisher_trace"]["audio"][0], result["fisher_trace"]["visual"][0]))


@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_a_device_the_machine_lacks_is_one_line_before_anything_runs(
    cremad: Path, device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--device`` is checked when parsed (a typo, or a GPU this machine does not have), by
    both trainers, instead of a torch traceback after the data has loaded."""
    from trainers import digits

    for main, argv in ((av_cli.main, ["--data-root", str(cremad)]), (digits.main, [])):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--in-process", "--device", device])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (line,) = [ln for ln in err.splitlines() if "error:" in ln]
        assert f"error: argument --device: {device!r}" in line
        assert "not a torch device" in line or "CUDA device" in line


def test_fixture_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainers.av.fixture import main

    assert main([str(tmp_path / "fx"), "--train-per-class", "1", "--test-per-class", "1"]) == 0
    assert "6 train and 6 test clips" in capsys.readouterr().out
    rows = csv_rows(tmp_path / "fx" / "train.csv")
    assert sorted(label for _, label in rows) == sorted(CREMAD_CLASSES)
    for name, label in rows:
        assert label in name and (tmp_path / "fx" / "AudioWAV" / f"{name}.wav").is_file()
        assert 2 <= len(list((tmp_path / "fx" / "Image-01-FPS" / name).glob("*.jpg"))) <= 3


@pytest.mark.e2e
def test_gpu_check_runs_the_trainer_step_plain_and_regulated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU script's smoke mode on the CPU (bf16 autocast): one plain and one regulated step."""
    from trainers.av import gpu_check

    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--batch-size", "1", "--image-size", "32", "--steps", "1", "--warmup", "0", "--amp", "bf16", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["amp"] == "bf16" and len(result["steps"]) == 1
    step = result["steps"][0]
    assert step["ratio"] > 0 and set(step["proximal"]) == {"audio", "visual"} and not step["skipped"]
    assert step["loss_plain"] == step["loss_hook"]  # the first step: same weights, anchors = weights
    assert result["hook_timings"]["steps"] == 1
    assert "hook/plain (median)" in capsys.readouterr().out
