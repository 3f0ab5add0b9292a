"""``sslkit train | eval``: the command line.

    sslkit train recipes/quickstart.yaml optim.lr=0.3 train.epochs=10
    sslkit train recipes/quickstart.yaml --num-processes 2      # launches through Accelerate
    accelerate launch -m sslkit train recipes/simclr_resnet18_cifar10.yaml
    sslkit eval knn --checkpoint runs/quickstart/checkpoints/last --data fashion_mnist
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command (and environment) that runs ``sslkit argv`` in N processes.

    On a machine without CUDA, ``accelerate launch --num_processes 2 --cpu`` starts ONE process;
    ``--multi_gpu`` with ACCELERATE_USE_CPU=true starts N joined by gloo, so that is what we use.
    """
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
        "--num_processes", str(num_processes), "--main_process_port", str(_free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sslkit", *argv,
    ]
    return cmd, env


def _train(args: argparse.Namespace) -> int:
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        cmd, env = launch_command(args.num_processes, ["train", args.recipe, *args.overrides])
        return subprocess.call(cmd, env=env)
    from sslkit.config import load_config
    from sslkit.engine import train

    train(load_config(args.recipe, args.overrides))
    return 0


def _eval_knn(args: argparse.Namespace) -> int:
    from sslkit.engine.checkpoint import load_feature_model
    from sslkit.engine.trainer import create_accelerator, knn_monitor

    cfg, model = load_feature_model(args.checkpoint)
    cfg.data.name = args.data
    cfg.data.root = args.data_root
    cfg.data.train_limit = cfg.data.test_limit = None  # the training run's limits do not apply
    cfg.eval.bank_limit, cfg.eval.test_limit = args.bank_limit, args.test_limit
    cfg.eval.knn_k = args.k if args.k is not None else cfg.eval.knn_k
    cfg.eval.knn_temperature = args.temperature if args.temperature is not None else cfg.eval.knn_temperature
    accelerator = create_accelerator(cfg.train)
    scores = knn_monitor(cfg, accelerator)(model.to(accelerator.device), accelerator)
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "k": cfg.eval.knn_k,
              "temperature": cfg.eval.knn_temperature, **scores}
    out = Path(args.output) if args.output else _default_output(Path(args.checkpoint), args.data)
    if accelerator.is_main_process:
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"k-NN on {args.data}: top-1 {scores['knn_top1']:.4f}  top-5 {scores['knn_top5']:.4f}  -> {out}")
    return 0


def _default_output(checkpoint: Path, data: str) -> Path:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return folder / f"knn_{data}.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslkit", description="Self-supervised pretraining for images.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain with a recipe")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.3 train.epochs=10")
    p.add_argument("--num-processes", type=int, default=1, help="launch N processes through Accelerate")
    p.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="protocol", required=True)
    k = ev.add_parser("knn", help="k-NN top-1/top-5 on clean features")
    k.add_argument("--checkpoint", required=True, help="runs/<name>/checkpoints/last or a backbone.safetensors")
    k.add_argument("--data", required=True, help="dataset name, e.g. fashion_mnist")
    k.add_argument("--data-root", default=None, help="where the dataset lives (default: its usual places)")
    k.add_argument("--k", type=int, default=None, help="neighbours (default: the recipe's eval.knn_k)")
    k.add_argument("--temperature", type=float, default=None, help="default: the recipe's eval.knn_temperature")
    k.add_argument("--bank-limit", type=int, default=None, help="use only the first N training images")
    k.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    k.add_argument("--output", default=None, help="JSON file (default: knn_<data>.json beside the checkpoint)")
    k.set_defaults(func=_eval_knn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`train r.yaml --num-processes 2 optim.lr=0.3`).
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "train" or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        # Bad input: one clear line, not a traceback (SSLKIT_DEBUG=1 shows the traceback).
        if os.environ.get("SSLKIT_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sslkit: error: {message}", file=sys.stderr)
        return 2
