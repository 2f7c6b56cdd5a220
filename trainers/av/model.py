"""The audio-visual classifier of the official InfoReg code (GeWu-Lab/InfoReg_CVPR2025,
``models/basic_model.py:AVClassifier`` with ``fusion_method concat``), in plain torch.

    model = AVClassifier(num_classes=6, fps=3)          # CREMA-D: 6 classes, 3 frames per clip
    audio, visual = model.example_inputs(batch_size=64)  # [64, 1, 257, 188], [64, 3, 3, 224, 224]
    fused, uni = model(audio, visual)                    # [64, 6], {"audio": [64, 6], "visual": [64, 6]}

- Audio encoder: ResNet-18 (torchvision's layout: 7x7/2 stem, 3x3/2 max pool, four stages of two
  BasicBlocks, 64-128-256-512 channels) on a 1-channel log-spectrogram, global average pool.
- Visual encoder: the same ResNet-18 with a 3-channel stem. A clip ``[B, 3, T, H, W]`` goes
  through it as a batch of ``B*T`` frames; the ``[B, 512, T, h, w]`` feature maps are averaged
  over time and space at once (the official ``adaptive_avg_pool3d(v, 1)``).
- Fusion: ``head = Linear(512 + 512, num_classes)`` on ``cat(audio, visual)``; the unimodal logits
  are what the head says from one modality alone, ``f_m @ W[:, slice_m].T + b / 2`` (the released
  code's ``out_a``/``out_v``), which InfoReg scores each modality by.
- Initialisation: the official ``weight_init`` (Kaiming-normal fan-out convolutions, batch norm
  1/0, Xavier-normal linear layers with zero bias).

The released model also builds ``head_audio``, ``head_video``, ``head2``, ``fc_x``, ``fc_y`` that
its concat path never uses (they get no gradient); they are left out here. torchvision is not
used: it cannot be imported beside this project's CPU torch wheel, and the network is short.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regulator_client.heads import concat_unimodal_logits

MODALITIES = ("audio", "visual")
FEATURE_DIM = 512
SPECTROGRAM_SHAPE = (257, 188)  # STFT bins x frames of 3 s at 22,050 Hz (n_fft 512, hop 353)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet-18/34)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class ResNet18(nn.Module):
    """ResNet-18 without its classifier: ``[N, in_channels, H, W]`` -> ``[N, 512, H/32, W/32]``."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class AVClassifier(nn.Module):
    """Audio and visual ResNet-18 encoders, concat fusion, one linear head.

    Args:
        num_classes: 6 for CREMA-D, 31 for Kinetics-Sounds.
        fps: frames per clip the visual encoder is fed (the official ``--fps``, default 3). The
            network itself accepts any T; ``fps`` is what ``example_inputs`` and the input check
            use, so a loader/model mismatch fails at the first batch instead of training on it.

    ``forward(audio, visual)`` takes ``audio [B, 1, F, T_a]`` (or ``[B, F, T_a]``) and
    ``visual [B, 3, fps, H, W]`` and returns ``(fused_logits, {"audio": ..., "visual": ...})``.
    The encoders are ``model.audio_net`` and ``model.visual_net`` (the names of the released
    code), ``model.encoders()`` maps modality -> encoder for ``InfoRegHook``.
    """

    def __init__(self, num_classes: int, fps: int = 3) -> None:
        super().__init__()
        if num_classes < 2 or fps < 1:
            raise ValueError(f"need num_classes >= 2 and fps >= 1, got {num_classes}, {fps}")
        self.num_classes = num_classes
        self.fps = fps
        self.audio_net = ResNet18(in_channels=1)
        self.visual_net = ResNet18(in_channels=3)
        self.head = nn.Linear(2 * FEATURE_DIM, num_classes)
        for m in self.modules():  # the official utils.weight_init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def encoders(self) -> dict[str, nn.Module]:
        """Modality -> encoder, in the order the session declares them."""
        return {"audio": self.audio_net, "visual": self.visual_net}

    def features(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        """The pooled 512-d features of both encoders."""
        if audio.dim() == 3:
            audio = audio.unsqueeze(1)
        if audio.dim() != 4 or audio.shape[1] != 1:
            raise ValueError(f"audio must be [B, 1, F, T] (or [B, F, T]), got {list(audio.shape)}")
        if visual.dim() != 5 or visual.shape[1] != 3 or visual.shape[2] != self.fps:
            raise ValueError(f"visual must be [B, 3, fps={self.fps}, H, W], got {list(visual.shape)}")
        if audio.shape[0] != visual.shape[0]:
            raise ValueError(f"batch sizes differ: audio {audio.shape[0]}, visual {visual.shape[0]}")
        b, c, t, h, w = visual.shape
        a = F.adaptive_avg_pool2d(self.audio_net(audio), 1).flatten(1)
        frames = visual.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # clip-major: frames of clip 0 first
        v = self.visual_net(frames)
        v = v.view(b, t, *v.shape[1:]).permute(0, 2, 1, 3, 4)  # [B, 512, T, h, w]
        return a, F.adaptive_avg_pool3d(v, 1).flatten(1)

    def forward(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        a, v = self.features(audio, visual)
        fused = self.head(torch.cat([a, v], dim=1))
        return fused, concat_unimodal_logits(self.head, {"audio": a, "visual": v})  # type: ignore[return-value]

    def example_inputs(
        self, batch_size: int, image_size: int = 224, device: Optional[torch.device | str] = None, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Synthetic inputs of the documented shapes (benchmarks, GPU checks): a log-spectrogram
        ``[B, 1, 257, 188]`` and normalised frames ``[B, 3, fps, image_size, image_size]``."""
        g = torch.Generator().manual_seed(seed)
        audio = torch.randn(batch_size, 1, *SPECTROGRAM_SHAPE, generator=g) * 2.0 - 4.0
        visual = torch.randn(batch_size, 3, self.fps, image_size, image_size, generator=g)
        return audio.to(device), visual.to(device)
