"""Evaluation protocols by name: what ``sslkit eval <name>`` and ``sslkit eval suite`` run.

A protocol is a function ``(cfg, model, accelerator, features=None, **options) -> result``
registered with :func:`register_protocol`, which also names its command-line options, the line
the command prints and the numbers it puts in the suite's table. Adding a protocol is one
decorated function: the command line and the suite find it in :data:`PROTOCOLS`.

``features`` are the clean features of both splits (:class:`~sslkit.eval.clean.CleanFeatures`)
for protocols that read only frozen features (``shared_features=True``): the suite embeds each
dataset once for all of them. Protocols that run the network themselves (fine-tuning, per-layer
and moment probes) are not given features.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from accelerate import Accelerator
from torch import nn

from sslkit.config import Config, config_from_dict
from sslkit.eval.clean import CleanFeatures, clean_features
from sslkit.eval.fewshot import check_fraction, fewshot_eval, fraction_linear_eval
from sslkit.eval.knn import knn_accuracy, knn_scores_multi
from sslkit.eval.knn_linear import knn_linear_eval
from sslkit.eval.linear import DEFAULT_EPOCHS, DEFAULT_LRS, train_linear_probes
from sslkit.registry import Registry

Run = Callable[..., dict]


@dataclass(frozen=True)
class Protocol:
    """A registered protocol (see the module docstring).

    Attributes:
        run: ``(cfg, model, accelerator, features=None, **options) -> result`` (a JSON-able dict).
        help: one line for ``sslkit eval --help``.
        summary: result -> the line the command prints.
        headline: result -> ``{column: accuracy}`` for the suite's table.
        arguments: adds the protocol's own options to its parser; their ``dest`` names are
            ``run``'s keyword arguments.
        shared_features: ``run`` reads only the clean features of both splits.
        needs_checkpoint: ``run`` takes ``checkpoint`` (the path), for what the feature network
            alone does not hold (the projection head).
        plot: (result, PNG path) -> writes the protocol's figure, for protocols that have one.
    """

    run: Run
    help: str
    summary: Callable[[dict], str]
    headline: Callable[[dict], dict[str, float]]
    arguments: Callable[[argparse.ArgumentParser], None]
    shared_features: bool = False
    needs_checkpoint: bool = False
    plot: Optional[Callable[[dict, Path], Path]] = None


PROTOCOLS: Registry[Protocol] = Registry("evaluation protocol")


def register_protocol(
    name: str,
    help: str,
    summary: Callable[[dict], str],
    headline: Callable[[dict], dict[str, float]],
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
    shared_features: bool = False,
    needs_checkpoint: bool = False,
    plot: Optional[Callable[[dict, Path], Path]] = None,
) -> Callable[[Run], Run]:
    """Decorator: register ``run`` as protocol ``name`` (the attributes of :class:`Protocol`)."""

    def add(run: Run) -> Run:
        PROTOCOLS.register(name)(Protocol(run, help, summary, headline, arguments, shared_features, needs_checkpoint,
                                          plot))
        return run

    return add


def run_protocol(
    name: str, cfg: Config, model: nn.Module, accelerator: Accelerator,
    features: Optional[CleanFeatures] = None, checkpoint: Optional[str | Path] = None, **options: Any,
) -> dict:
    """Run protocol ``name``; a shared-features protocol embeds both splits when not given them,
    ``checkpoint`` goes to the protocols that need it."""
    protocol = PROTOCOLS.get(name)
    if protocol.needs_checkpoint:
        options["checkpoint"] = checkpoint
    if protocol.shared_features:
        features = features if features is not None else clean_features(cfg, model, accelerator)
        return protocol.run(cfg, model, accelerator, features=features, **options)
    return protocol.run(cfg, model, accelerator, **options)


# --- k-NN -------------------------------------------------------------------------------------


def _knn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=None, help="neighbours (default: the recipe's eval.knn_k)")
    p.add_argument("--ks", type=int, nargs="*", default=[], help="more k from the same search, e.g. --ks 10 100 200")
    p.add_argument("--temperature", type=float, default=None, help="default: the recipe's eval.knn_temperature")


@register_protocol(
    "knn", "k-NN top-1/top-5 on clean features",
    summary=lambda r: f"top-1 {r['knn_top1']:.4f}  top-5 {r['knn_top5']:.4f}",
    headline=lambda r: {"knn": r["knn_top1"]},
    arguments=_knn_arguments, shared_features=True,
)
def knn_protocol(
    cfg: Config, model: nn.Module, accelerator: Accelerator, features: CleanFeatures,
    k: Optional[int] = None, ks: Sequence[int] = (), temperature: Optional[float] = None,
) -> dict:
    """Weighted k-NN of the test features among the train features (``eval.knn_*`` unless given)."""
    tree = cfg.to_dict()
    tree["eval"].update({"knn_ks": list(ks), **({"knn_k": k} if k is not None else {}),
                         **({"knn_temperature": temperature} if temperature is not None else {})})
    e = config_from_dict(tree).eval  # validates k and the temperature as a recipe's are
    extra = [x for x in dict.fromkeys(e.knn_ks) if x != e.knn_k]
    scores = knn_scores_multi(features.test, features.train, features.train_labels, features.num_classes,
                              (e.knn_k, *extra), e.knn_temperature)  # {k: (Q, C)}
    result = {"k": e.knn_k, "temperature": e.knn_temperature, **knn_accuracy(scores[e.knn_k], features.test_labels)}
    result.update({f"knn_top1_k{x}": knn_accuracy(scores[x], features.test_labels, (1,))["knn_top1"] for x in extra})
    return result


# --- linear probe -----------------------------------------------------------------------------


def _linear_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="one head per learning rate")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--with-knn", action="store_true",
                   help="also k-NN and the two interpolated, lambda chosen on a validation split of the train split")
    p.add_argument("--label-fraction", dest="label_fractions", type=float, nargs="+", default=[], metavar="F",
                   help="also probes on class-balanced fractions of the train labels, e.g. 0.01 0.1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one draw per seed (--label-fraction)")


def _linear_summary(r: dict) -> str:
    line = f"top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f} (best lr {r['best_lr']:g})"
    if "knn_linear" in r:
        m = r["knn_linear"]
        line += f"  k-NN {m['knn_top1']:.4f}  k-NN+linear {m['top1']:.4f} (lambda {m['lambda']:g})"
    return line + "".join(f"  {f:g} of labels {x['mean_top1']:.4f} +- {x['std_top1']:.4f}"
                          for f, x in r.get("label_fractions", {}).items())


def _linear_headline(r: dict) -> dict[str, float]:
    out = {"linear": r["top1"]}
    if "knn_linear" in r:
        out["knn+linear"] = r["knn_linear"]["top1"]
    out.update({f"linear {100 * f:g}%": x["mean_top1"] for f, x in r.get("label_fractions", {}).items()})
    return out


@register_protocol(
    "linear", "linear probe on cached frozen features, several learning rates in one pass",
    summary=_linear_summary, headline=_linear_headline, arguments=_linear_arguments, shared_features=True,
)
def linear_protocol(
    cfg: Config, model: nn.Module, accelerator: Accelerator, features: CleanFeatures,
    lrs: Sequence[float] = DEFAULT_LRS, epochs: int = DEFAULT_EPOCHS, with_knn: bool = False,
    label_fractions: Sequence[float] = (), seeds: Sequence[int] = (0, 1, 2),
) -> dict:
    """:func:`~sslkit.eval.linear.train_linear_probes` on the clean features; with ``with_knn`` also
    :func:`~sslkit.eval.knn_linear.knn_linear_eval` (key ``knn_linear``, the recipe's k-NN settings);
    with ``label_fractions`` the probes on class-balanced subsets, one per seed (key ``label_fractions``)."""
    f = features
    for fraction in label_fractions:
        check_fraction(fraction)  # before the slow part
    result = train_linear_probes(f.train, f.train_labels, f.test, f.test_labels, f.num_classes, lrs=lrs,
                                 epochs=epochs)
    if with_knn:
        result["knn_linear"] = knn_linear_eval(f.train, f.train_labels, f.test, f.test_labels, f.num_classes,
                                               cfg.eval.knn_k, cfg.eval.knn_temperature, lrs, epochs)
    if label_fractions:
        result["label_fractions"] = fraction_linear_eval(f.train, f.train_labels, f.test, f.test_labels,
                                                         f.num_classes, label_fractions, seeds, lrs=lrs, epochs=epochs)
    return result


# --- few-shot ---------------------------------------------------------------------------------


def _fewshot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="labelled images per class")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])


@register_protocol(
    "fewshot", "N-shot linear probes over several seeds (mean and std)",
    summary=lambda r: "  ".join(f"{n}-shot {x['mean_top1']:.4f} +- {x['std_top1']:.4f}" for n, x in r.items()),
    headline=lambda r: {f"{n}-shot": x["mean_top1"] for n, x in r.items()},
    arguments=_fewshot_arguments, shared_features=True,
)
def fewshot_protocol(
    cfg: Config, model: nn.Module, accelerator: Accelerator, features: CleanFeatures,
    shots: Sequence[int] = (1, 5, 10), seeds: Sequence[int] = (0, 1, 2),
) -> dict:
    """:func:`~sslkit.eval.fewshot.fewshot_eval` on the clean features."""
    f = features
    return fewshot_eval(f.train, f.train_labels, f.test, f.test_labels, f.num_classes, shots=shots, seeds=seeds)
from sslkit.eval import layers  # noqa: E402,F401  (registers "layers")
from sslkit.eval import moments  # noqa: E402,F401  (registers "moments")
from sslkit.eval import finetune  # noqa: E402,F401  (registers "finetune")
