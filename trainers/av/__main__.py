"""The paper's audio-visual job through the regulator.

    python -m trainers.av --dataset cremad --data-root DATA --target 127.0.0.1:50051 --out result.json
    python -m trainers.av --dataset cremad --data-root DATA --in-process --epochs 1 --image-size 64 --batch-size 8

See ``trainers/av/data.py`` for the data layout and ``trainers/av/train.py`` for the defaults
(the released InfoReg code's). Exit status 2 with one line naming the file when the data set is
unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional, Sequence

from regulator_client.cli_args import add_connection_flags
from regulator_client.profiles import PROFILE_NAMES

from ..device import add_device_flag
from ..digits import client_from_args
from .data import DATASETS, AVDataError
from .train import AMP_DTYPES, AVConfig, train

DEFAULTS = AVConfig()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainers.av", description=__doc__.split("\n\n")[0])
    add_connection_flags(p, timeout_flag="--call-timeout", default_timeout=10.0)
    p.add_argument("--in-process", action="store_true", help="run the policy in this process (no server)")
    d = p.add_argument_group("data (layout: trainers/av/data.py)")
    d.add_argument("--dataset", choices=DATASETS, default=DEFAULTS.dataset, help="CREMA-D (6 classes) or Kinetics-Sounds (31)")
    d.add_argument("--data-root", default=None, help="holds train.csv, test.csv, AudioWAV/, Image-01-FPS/")
    d.add_argument("--audio-root", default=None, help="folder of <name>.wav (default DATA_ROOT/AudioWAV)")
    d.add_argument("--visual-root", default=None, help="folder of <name>/*.jpg (default DATA_ROOT/Image-01-FPS)")
    d.add_argument("--train-csv", default=None, help="default DATA_ROOT/train.csv")
    d.add_argument("--test-csv", default=None, help="default DATA_ROOT/test.csv")
    d.add_argument("--classes", dest="classes_file", default=None, help="Kinetics-Sounds class names, one per line (default DATA_ROOT/classes.txt if present)")
    d.add_argument("--skip-missing", action="store_true", help="drop rows whose WAV or frame folder is missing (the released loader does) instead of failing")
    d.add_argument("--fps", type=int, default=DEFAULTS.fps, help="frames sampled per clip (default 3)")
    d.add_argument("--image-size", type=int, default=DEFAULTS.image_size, help="frame side in pixels (default 224; lower for quick checks)")
    d.add_argument("--workers", type=int, default=DEFAULTS.workers, help=f"DataLoader worker processes (default 4, at most the CPUs: {DEFAULTS.workers} here)")
    t = p.add_argument_group("training")
    t.add_argument("--profile", choices=PROFILE_NAMES, default=DEFAULTS.profile)
    t.add_argument("--reference-modality", choices=("audio", "visual"), default="audio", help="official profile: the reference (default audio)")
    t.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    t.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    t.add_argument("--lr", type=float, default=DEFAULTS.lr)
    t.add_argument("--seed", type=int, default=DEFAULTS.seed)
    t.add_argument("--unimodal-loss", action=argparse.BooleanOptionalAction, default=DEFAULTS.unimodal_loss,
                   help="add the unimodal CE terms, as the released code does (default on)")
    add_device_flag(t)
    t.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None, help="mixed precision: bf16 autocast, or fp16 autocast with a GradScaler")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--max-steps-per-epoch", type=int, default=None, help="stop each epoch after N steps (quick checks)")
    t.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every, help="test every N epochs (0: after the last only)")
    t.add_argument("--log-every", type=int, default=DEFAULTS.log_every, help="a progress line every N steps (0: per epoch only)")
    t.add_argument("--job-id", default=None)
    t.add_argument("--record", default=None, help="write the statistics trace to this file")
    t.add_argument("--on-unavailable", choices=("wait", "neutral", "last"), default=None,
                   help="when the regulator is down (default: $REGULATOR_ON_UNAVAILABLE, else wait)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p


def config_from_args(args: argparse.Namespace) -> AVConfig:
    names = {f.name for f in fields(AVConfig)}
    cfg = AVConfig(**{k: v for k, v in vars(args).items() if k in names and k != "profile_params"})
    cfg.profile_params = {"reference_modality": args.reference_modality} if args.profile == "official" else {}
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for flag in ("epochs", "batch_size", "fps", "image_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if args.data_root is None and not (args.train_csv and args.test_csv and args.audio_root and args.visual_root):
        p.error("give --data-root (or all of --train-csv, --test-csv, --audio-root, --visual-root)")
    cfg = config_from_args(args)
    try:
        with client_from_args(p, args) as client:
            result = train(cfg, client)
    except AVDataError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    uni = ", ".join(f"{m} {100 * a:.1f}%" for m, a in result["unimodal_acc"].items())
    print(f"{cfg.dataset} {cfg.profile}: fused {100 * result['fused_acc']:.2f}%, heads {uni}, "
          f"windows open {result['window_open_epochs']}, {result['wall_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
