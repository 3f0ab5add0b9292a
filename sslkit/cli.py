"""``sslkit train | eval knn|linear|fewshot | plot | export | embed``: the command line.

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
from typing import Any, Optional

import torch
from accelerate import Accelerator
from torch import nn

from sslkit.config import Config, DataConfig, apply_override, config_from_dict, load_config
from sslkit.data import item_keys, load_dataset
from sslkit.embed import SUMMARY, check_embed_options, embed
from sslkit.engine import train
from sslkit.engine.checkpoint import load_feature_model
from sslkit.engine.guards import parent_death_signal
from sslkit.engine.run_dir import check_run_dir_free, run_path
from sslkit.errors import UserError
from sslkit.engine.trainer import create_accelerator, knn_monitor
from sslkit.eval.clean import clean_batches, clean_features, clean_transform
from sslkit.eval.fewshot import fewshot_eval
from sslkit.eval.knn import DEFAULT_CHUNK
from sslkit.eval.linear import DEFAULT_EPOCHS, DEFAULT_LRS, train_linear_probes
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


def _evaluation(
    args: argparse.Namespace, options: Optional[dict[str, Any]] = None
) -> tuple[Config, nn.Module, Accelerator]:
    """The checkpoint's config and feature network, pointed at ``--data``: the options (as
    ``section.key`` values) and the ``key=value`` overrides are validated as ``train``'s are."""
    cfg, model = load_feature_model(args.checkpoint)
    tree = cfg.to_dict()
    if args.data is None:  # the run's labelled set: its eval.data, else its training data
        tree["data"] = {**(tree["eval"]["data"] or tree["data"]), "train_limit": None, "test_limit": None}
        if args.data_root is not None:
            tree["data"]["root"] = args.data_root
    else:
        # --data is a data section of its own: the training data's shared keys (channels, image_size,
        # workers, ...), not its source's own keys
        shared = {key: tree["data"][key] for key in DataConfig.model_fields if key in tree["data"]}
        tree["data"] = {**shared, "name": args.data, "root": args.data_root, "train_limit": None, "test_limit": None}
    tree["eval"]["data"] = None  # the training run's limits do not apply; --bank-limit, --test-limit do (options)
    args.data = tree["data"]["name"]
    settings = dict(options or {})
    for key, value in settings.items():
        section, name = key.split(".")
        tree[section][name] = value
    for override in args.overrides:
        apply_override(tree, override)
    cfg = config_from_dict(tree)
    accelerator = create_accelerator(cfg.train)
    return cfg, model.to(accelerator.device), accelerator


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    return {"eval.bank_limit": args.bank_limit, "eval.test_limit": args.test_limit}


def _report(args: argparse.Namespace, accelerator: Accelerator, protocol: str, result: dict, line: str) -> None:
    out = Path(args.output) if args.output else _default_output(Path(args.checkpoint), f"{protocol}_{args.data}")
    if accelerator.is_main_process:
        out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "data": args.data, **result}, indent=2) + "\n")
        print(f"{protocol} on {args.data}: {line}  -> {out}")


def _eval_knn(args: argparse.Namespace) -> int:
    options = {**_limits(args), "eval.knn_ks": args.ks, **({"eval.knn_k": args.k} if args.k is not None else {}),
               **({"eval.knn_temperature": args.temperature} if args.temperature is not None else {})}
    cfg, model, accelerator = _evaluation(args, options)
    scores = knn_monitor(cfg, accelerator)(model, accelerator)
    result = {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature, **scores}
    _report(args, accelerator, "knn", result, f"top-1 {scores['knn_top1']:.4f}  top-5 {scores['knn_top5']:.4f}")
    return 0


def _eval_linear(args: argparse.Namespace) -> int:
    cfg, model, accelerator = _evaluation(args, _limits(args))
    train_f, train_l, test_f, test_l, classes = clean_features(cfg, model, accelerator)
    result = train_linear_probes(train_f, train_l, test_f, test_l, classes, lrs=args.lrs, epochs=args.epochs)
    _report(args, accelerator, "linear", result,
            f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f} (best lr {result['best_lr']:g})")
    return 0


def _eval_fewshot(args: argparse.Namespace) -> int:
    cfg, model, accelerator = _evaluation(args, _limits(args))
    train_f, train_l, test_f, test_l, classes = clean_features(cfg, model, accelerator)
    result = fewshot_eval(train_f, train_l, test_f, test_l, classes, shots=args.shots, seeds=args.seeds)
    line = "  ".join(f"{n}-shot {r['mean_top1']:.4f} +- {r['std_top1']:.4f}" for n, r in result.items())
    _report(args, accelerator, "fewshot", result, line)
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

    def protocol(name: str, help: str, func) -> argparse.ArgumentParser:
        p = ev.add_parser(name, help=help)
        p.add_argument("--checkpoint", required=True, help="runs/<name>/checkpoints/last or a backbone.safetensors")
        p.add_argument("--data", default=None,
                       help="dataset name, e.g. fashion_mnist (default: the run's eval.data, else its training data)")
        p.add_argument("--data-root", default=None, help="where the dataset lives (default: its usual places)")
        p.add_argument("--bank-limit", type=int, default=None, help="use only the first N training images")
        p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
        p.add_argument("--output", default=None, help=f"JSON file (default: {name}_<data>.json beside the checkpoint)")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.batch_size=256 data.image_size=64")
        p.set_defaults(func=func)
        return p

    k = protocol("knn", "k-NN top-1/top-5 on clean features", _eval_knn)
    k.add_argument("--k", type=int, default=None, help="neighbours (default: the recipe's eval.knn_k)")
    k.add_argument("--ks", type=int, nargs="*", default=[], help="more k from the same search, e.g. --ks 10 100 200")
    k.add_argument("--temperature", type=float, default=None, help="default: the recipe's eval.knn_temperature")
    lin = protocol("linear", "linear probe on cached frozen features, several learning rates in one pass",
                   _eval_linear)
    lin.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="one head per learning rate")
    lin.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    few = protocol("fewshot", "N-shot linear probes over several seeds (mean and std)", _eval_fewshot)
    few.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="labelled images per class")
    few.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])

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
