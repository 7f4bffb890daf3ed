"""python -m training: train the dual encoder. Flags win over an optional YAML config file."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from training.models import ModelConfig
from training.train import TrainConfig, train


def _add_fields(p: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(t) is list:
            p.add_argument(flag, type=float, nargs="+", default=None)
        else:
            args = [a for a in typing.get_args(t) if a is not type(None)]
            p.add_argument(flag, type=args[0] if args else t, default=None)


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, ModelConfig]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    p = argparse.ArgumentParser(prog="python -m training", parents=[pre],
                                description="Train the mmdemo dual encoder.")
    _add_fields(p, TrainConfig)
    _add_fields(p, ModelConfig)
    args = vars(p.parse_args(argv))
    values: dict = {}
    if known.config is not None:
        import yaml

        if not known.config.is_file():
            p.error(f"config file {known.config} does not exist")
        loaded = yaml.safe_load(known.config.read_text()) or {}
        if not isinstance(loaded, dict):
            p.error(f"{known.config} must hold a mapping of option: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in args.items() if v is not None and k != "config"})
    names_t = {f.name for f in dataclasses.fields(TrainConfig)}
    names_m = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    unknown = set(values) - names_t - names_m
    if unknown:
        p.error(f"unknown option(s) in config: {sorted(unknown)}")
    return (TrainConfig(**{k: v for k, v in values.items() if k in names_t}),
            ModelConfig(**{k: v for k, v in values.items() if k in names_m}))


def main(argv: list[str] | None = None) -> Path:
    cfg, model_cfg = parse(argv)
    try:
        return train(cfg, model_cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
