"""``sslkit train | eval <protocol> | plot | export | embed``: the command line.

    sslkit train recipes/quickstart.yaml optim.lr=0.3 train.epochs=10
    sslkit train recipes/quickstart.yaml --num-processes 2      # launches through Accelerate
    accelerate launch -m sslkit train recipes/simclr_resnet18_cifar10.yaml
    sslkit eval knn --checkpoint runs/quickstart/checkpoints/last --data fashion_mnist
    sslkit eval linear --checkpoint runs/quickstart/backbone.safetensors --data fashion_mnist
    sslkit plot runs/quickstart
    sslkit export runs/mae_fashion_mnist --format hf            # timm-loadable, no sslkit needed
    sslkit embed --checkpoint runs/quickstart/backbone.safetensors --data fashion_mnist --out emb/ --neighbors 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from sslkit.config import Config, load_config
from sslkit.data import item_keys, load_dataset
from sslkit.embed import SUMMARY, check_embed_options, embed
from sslkit.engine import train
from sslkit.engine.guards import parent_death_signal
from sslkit.engine.run_dir import check_run_dir_free, run_path
from sslkit.errors import UserError
from sslkit.eval.clean import clean_batches, clean_transform, evaluation_setup
from sslkit.eval.knn import DEFAULT_CHUNK
from sslkit.eval.protocols import PROTOCOLS, run_protocol
from sslkit.eval.suite import default_protocols, run_suite
from sslkit.export import FORMATS, export_run


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
        # A run directory in use is refused here in one line, before any process is launched.
        check_run_dir_free(run_path(load_config(args.recipe, args.overrides)))
        cmd, env = launch_command(args.num_processes, ["train", args.recipe, *args.overrides])
        # Killing this process, even with SIGKILL, sends the launcher SIGTERM, which it passes on
        # to its workers: they save a checkpoint and stop, as on SIGTERM.
        return subprocess.call(cmd, env=env, preexec_fn=parent_death_signal(signal.SIGTERM))
    train(load_config(args.recipe, args.overrides))
    return 0


# The options every `eval <protocol>` has; the rest are the protocol's own (its run's keywords).
_EVAL_COMMON = {"command", "protocol", "func", "checkpoint", "data", "data_root", "bank_limit", "test_limit",
                "output", "overrides"}


def _evaluation(args: argparse.Namespace) -> tuple[Config, nn.Module, Accelerator]:
    """:func:`evaluation_setup` from the command's options; ``args.data`` becomes the data's name."""
    cfg, model, accelerator = evaluation_setup(
        args.checkpoint, args.data, args.data_root, overrides=args.overrides,
        settings={"eval.bank_limit": getattr(args, "bank_limit", None),
                  "eval.test_limit": getattr(args, "test_limit", None)},
    )
    args.data = cfg.data.name
    return cfg, model, accelerator


def _eval(args: argparse.Namespace) -> int:
    """``sslkit eval <protocol>``: run it, write its JSON (and figure), print its line."""
    protocol = PROTOCOLS.get(args.protocol)
    options = {key: value for key, value in vars(args).items() if key not in _EVAL_COMMON}
    cfg, model, accelerator = _evaluation(args)
    result = run_protocol(args.protocol, cfg, model, accelerator, checkpoint=args.checkpoint, **options)
    out = Path(args.output) if args.output else _default_output(Path(args.checkpoint), f"{args.protocol}_{args.data}")
    if accelerator.is_main_process:
        out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "data": args.data, **result}, indent=2) + "\n")
        figure = f", {protocol.plot(result, out.with_suffix('.png'))}" if protocol.plot is not None else ""
        print(f"{args.protocol} on {args.data}: {protocol.summary(result)}  -> {out}{figure}")
    return 0


def _suite(args: argparse.Namespace) -> int:
    report = run_suite(args.checkpoint, args.data, args.protocols, args.output,
                       {"eval.bank_limit": args.bank_limit, "eval.test_limit": args.test_limit}, args.overrides)
    if report.get("files"):
        print(f"suite: {len(report['datasets'])} dataset(s), {len(report['skipped'])} skipped -> "
              f"{', '.join(report['files'])}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from sslkit.plot import plot_run  # matplotlib only for this command

    for path in plot_run(args.run_dir, limit=args.limit):
        print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    done = export_run(args.run_dir, args.format, checkpoint=args.checkpoint, output=args.output)
    print(f"exported {done['source']} ({args.format}) -> {done['folder']}")
    print(f"load it with timm alone:\n{done['load']}")
    if args.format == "hf":
        print(f"push it to the Hugging Face Hub: huggingface_hub.upload_folder(repo_id='<user>/<repo>', "
              f"folder_path='{done['folder']}')")
    return 0


def _embed(args: argparse.Namespace) -> int:
    check_embed_options(args.neighbors, args.duplicates)  # before the slow part
    if args.chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    cfg, model, accelerator = _evaluation(args)
    data = load_dataset(cfg.data, args.split)
    out = Path(args.out)
    result = embed(model, clean_batches(cfg, accelerator, data), clean_transform(cfg), accelerator,
                   item_keys(data, cfg.data.name, args.split), out, neighbors=args.neighbors,
                   duplicates=args.duplicates, chunk_size=args.chunk_size, progress=cfg.train.progress)
    summary = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split,
               "neighbors": args.neighbors, "duplicates": args.duplicates, **result}
    summary["files"].append(SUMMARY)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    pairs = "" if args.duplicates is None else (
        f", {result['duplicate_pairs']} pair(s) with similarity >= {args.duplicates:g}")
    skipped = f", {len(result['skipped'])} undecodable file(s) left out" if result["skipped"] else ""
    print(f"embedded {result['items']} images of {args.data} ({args.split}), {result['dim']} dimensions"
          f"{pairs}{skipped} -> {out}")
    return 0


def _default_output(checkpoint: Path, stem: str) -> Path:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return folder / f"{stem}.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslkit", description="Self-supervised pretraining for images.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain with a recipe")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.3 train.epochs=10")
    p.add_argument("--num-processes", type=int, default=1, help="launch N processes through Accelerate")
    p.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="protocol", required=True)

    def protocol(name: str, help: str) -> argparse.ArgumentParser:
        p = ev.add_parser(name, help=help)
        p.add_argument("--checkpoint", required=True, help="runs/<name>/checkpoints/last or a backbone.safetensors")
        p.add_argument("--data", default=None,
                       help="dataset name, e.g. fashion_mnist (default: the run's eval.data, else its training data)")
        p.add_argument("--data-root", default=None, help="where the dataset lives (default: its usual places)")
        p.add_argument("--bank-limit", type=int, default=None, help="use only the first N training images")
        p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
        p.add_argument("--output", default=None, help=f"JSON file (default: {name}_<data>.json beside the checkpoint)")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.batch_size=256 data.image_size=64")
        p.set_defaults(func=_eval)
        return p

    for name in PROTOCOLS.names():
        PROTOCOLS.get(name).arguments(protocol(name, PROTOCOLS.get(name).help))

    su = ev.add_parser("suite", help="several protocols on several datasets: report.md, report.json, report.png")
    su.add_argument("--checkpoint", required=True, help="runs/<name>/checkpoints/last or a backbone.safetensors")
    su.add_argument("--data", nargs="+", required=True, metavar="NAME[:ROOT]",
                    help="datasets, e.g. fashion_mnist cifar10 image_folder:/data/pets (those not found are skipped)")
    su.add_argument("--protocols", nargs="+", default=default_protocols(), choices=PROTOCOLS.names(),
                    help="run with their defaults (default: those on frozen features, %(default)s)")
    su.add_argument("--bank-limit", type=int, default=None, help="use only the first N training images")
    su.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    su.add_argument("--output", default=None, help="folder (default: suite/ beside the checkpoint)")
    su.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.image_size=32")
    su.set_defaults(func=_suite)

    pl = sub.add_parser("plot", help="PNG curves of a run and a 2-D map of its test features")
    pl.add_argument("run_dir", help="runs/<name>")
    pl.add_argument("--limit", type=int, default=2000, help="test images in the 2-D map")
    pl.set_defaults(func=_plot)

    ex = sub.add_parser("export", help="the run's feature network for timm alone, or as a Hugging Face Hub folder")
    ex.add_argument("run_dir", help="runs/<name>")
    ex.add_argument("--format", choices=FORMATS, default="timm",
                    help="timm: weights + the timm.create_model line; hf: the Hub layout timm loads (default: timm)")
    ex.add_argument("--checkpoint", default=None,
                    help="default: <run>/backbone.safetensors, else <run>/checkpoints/last")
    ex.add_argument("--output", default=None, help="folder (default: <run>/export/<format>/)")
    ex.set_defaults(func=_export)

    em = sub.add_parser("embed", help="features of every image, a FAISS index, nearest neighbours and duplicates")
    em.add_argument("--checkpoint", required=True, help="runs/<name>/checkpoints/last or a backbone.safetensors")
    em.add_argument("--data", required=True, help="dataset name, e.g. image_folder or fashion_mnist")
    em.add_argument("--data-root", default=None, help="where the dataset lives (default: its usual places)")
    em.add_argument("--split", choices=("train", "test"), default="train",
                    help="which split to embed (an image folder without split folders has one)")
    em.add_argument("--out", required=True, help="folder for embeddings.npy, items.txt, index.faiss, ...")
    em.add_argument("--neighbors", type=int, default=None, metavar="K",
                    help="write neighbors.jsonl: each image's K most similar others")
    em.add_argument("--duplicates", type=float, default=None, metavar="T",
                    help="write duplicates.jsonl: every pair with cosine similarity >= T, e.g. 0.95")
    em.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                    help="queries per search call and most rows per duplicate block (lower it to use less memory)")
    em.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.image_size=224 eval.batch_size=256")
    em.set_defaults(func=_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`train r.yaml --num-processes 2 optim.lr=0.3`).
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    if extra and (not takes_overrides or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        return args.func(args)
    except UserError as err:
        # Bad input: one clear line, not a traceback (SSLKIT_DEBUG=1 shows the traceback). Any
        # other exception is a bug and keeps its traceback.
        if os.environ.get("SSLKIT_DEBUG"):
            raise
        sys.stderr.write(f"sslkit: error: {err}\n")  # one write: lines of several processes stay whole
        return 2
