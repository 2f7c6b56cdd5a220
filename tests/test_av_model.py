"""The audio-visual model (trainers/av/model.py): the official architecture and its outputs."""

from __future__ import annotations

import pytest
import torch

from trainers.av.model import AVClassifier


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_encoders_are_resnet18_and_the_head_is_concat_linear() -> None:
    model = AVClassifier(num_classes=6, fps=3)
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its 1000-class fc;
    # the audio stem takes 1 channel instead of 3 (64*7*7*2 fewer weights).
    assert n_params(model.visual_net) == 11_689_512 - 513_000
    assert n_params(model.audio_net) == 11_689_512 - 513_000 - 64 * 7 * 7 * 2
    assert (model.head.in_features, model.head.out_features) == (1024, 6)
    assert list(model.encoders()) == ["audio", "visual"]
    # the released code's parameter names, so its checkpoints' encoder weights load
    names = set(model.state_dict())
    assert {"audio_net.conv1.weight", "visual_net.layer4.1.bn2.running_var", "head.weight"} <= names


def test_forward_shapes_and_unimodal_logits_add_up_to_the_fused_ones() -> None:
    torch.manual_seed(0)
    model = AVClassifier(num_classes=31, fps=2)
    audio, visual = model.example_inputs(3, image_size=64)
    assert audio.shape == (3, 1, 257, 188) and visual.shape == (3, 3, 2, 64, 64)
    audio = audio[..., :64, :48]  # the encoders pool globally: a smaller spectrogram keeps the test fast
    fused, uni = model(audio, visual)
    assert fused.shape == (3, 31) and set(uni) == {"audio", "visual"}
    # W[:, :512] a + b/2 + W[:, 512:] v + b/2 == W [a; v] + b
    torch.testing.assert_close(uni["audio"] + uni["visual"], fused, rtol=1e-5, atol=1e-5)
    a, v = model.features(audio, visual)
    torch.testing.assert_close(uni["audio"], a @ model.head.weight[:, :512].T + model.head.bias / 2)


def test_frames_are_encoded_per_clip_and_averaged_over_time() -> None:
    """Each clip's features depend only on its own frames (no mixing across the batch), and the
    order of a clip's frames does not matter (time is average-pooled)."""
    torch.manual_seed(1)
    model = AVClassifier(num_classes=6, fps=3).eval()
    audio, visual = model.example_inputs(2, image_size=32)
    audio = audio[..., :32, :32]
    _, v = model.features(audio, visual)
    _, v0 = model.features(audio[:1], visual[:1])
    _, v_rev = model.features(audio, visual.flip(2))
    torch.testing.assert_close(v[:1], v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, v_rev, rtol=1e-5, atol=1e-6)


def test_wrong_input_shapes_fail_clearly() -> None:
    model = AVClassifier(num_classes=6, fps=3)
    audio, visual = model.example_inputs(2, image_size=32)
    with pytest.raises(ValueError, match=r"visual must be \[B, 3, fps=3"):
        model(audio, visual[:, :, :2])
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(audio[:1], visual)
    with pytest.raises(ValueError, match="audio must be"):
        model(audio.expand(2, 2, 257, 188), visual)
