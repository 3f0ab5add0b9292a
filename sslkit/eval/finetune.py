"""End-to-end fine-tuning of a pretrained backbone with a linear head, on all or a fraction of the labels.

Protocol (:func:`finetune`), for the labelled train split or a class-balanced fraction of it
(:func:`~sslkit.eval.fewshot.balanced_indices`, one draw per seed: the semi-supervised protocol
of SimCLR, Chen et al. ICML 2020, and BYOL, Grill et al. NeurIPS 2020):

1. **Linear probe first** (LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained Features and
   Underperform Out-of-Distribution", ICLR 2022): the head starts as a linear probe on the frozen
   clean features of the labelled images, its lr chosen on a held-out fifth of them; the feature
   standardisation is folded into its weights. A random head's large early gradients would
   otherwise disturb the pretrained features before the head is any good: with a random head,
   the quickstart backbone fine-tuned to below its own frozen probe.
2. **Fine-tune everything**: the batched device augmentation of the ``finetune`` preset (a flip;
   crops from ``min_scale`` of the area up, none by default), AdamW (or SGD) with a linear
   warm-up and a cosine decay, the lr scaled by batch / 256, layer-wise lr decay for ViTs (MAE's
   0.75: block i of L gets 0.75^(L - i), :func:`param_groups`), label smoothing 0.1, the run's
   mixed precision, a progress bar on the main process. Small label sets get at least
   ``min_steps`` steps. BatchNorm layers keep the statistics they were pretrained with (their
   scales and shifts train): new statistics would move the features under the probe head at
   the first step. Measured: a tiny CNN pretrained on synthetic images fell from 0.74 to 0.16
   top-1 on Fashion-MNIST when fine-tuned at lr ~0 with its statistics updated; with small
   label sets the statistics would also be estimated from few images. The defaults (lr 1e-3,
   no crops) were chosen on the quickstart backbone at 10% of the labels, seed 0, probe start
   0.8513: crops of 0.5-1 ended at 0.8430, 0.8-1 at 0.8613, none at 0.8743 (lr 1e-3); lr 3e-4
   with 0.5-1 crops at 0.8335. At these budgets the crops shift the training images away from
   the whole, centred test images more than they regularise.
3. Top-1/top-5 of the fine-tuned network on the clean test split.

The network given is not changed: a copy is trained.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from sslkit.augment import augment_config, create_augment
from sslkit.config import Config, Section, validate
from sslkit.data import make_batches
from sslkit.eval.clean import clean_batches, clean_splits, clean_transform
from sslkit.eval.features import extract_features
from sslkit.eval.fewshot import balanced_indices, check_fraction, mean_and_spread
from sslkit.eval.linear import DEFAULT_LRS, feature_stats, fit_linear_heads, heads_accuracy, topk_accuracy
from sslkit.eval.protocols import register_protocol
from sslkit.schedules import cosine


class FinetuneConfig(Section):
    """Fine-tuning settings (``sslkit eval finetune --lr ...``), with where each default comes from."""

    epochs: int = Field(3, ge=1)  # passes over the labelled images (CPU-sized; MAE: 100 for ViT-B)
    min_steps: int = Field(300, ge=1)  # at least this many steps, for 1% and 10% subsets
    batch_size: int = Field(256, ge=1)  # the global batch
    optimizer: Literal["adamw", "sgd"] = "adamw"  # MAE, BEiT: AdamW; SimCLR's semi-supervised: SGD (Nesterov)
    lr: float = Field(1e-3, gt=0)  # per 256 images; chosen on the quickstart backbone (docs/evaluation.md)
    weight_decay: float = Field(0.05, ge=0)  # MAE's fine-tuning
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # of the steps, linear warm-up
    layer_decay: float = Field(0.75, gt=0, le=1)  # MAE's, for ViTs (blocks); other backbones: none
    label_smoothing: float = Field(0.1, ge=0, lt=1)  # MAE, DeiT
    min_scale: float = Field(1.0, gt=0, le=1)  # the smallest crop (area fraction): none; see the module docstring
    head_init: Literal["probe", "zeros"] = "probe"  # probe: LP-FT (module docstring)
    freeze_bn_stats: bool = True  # BatchNorm keeps its statistics (module docstring); its affine weights train


def probe_head(feats: Tensor, labels: Tensor, num_classes: int, seed: int) -> nn.Linear:
    """A linear head on frozen features (N, D) that takes the raw features: fitted on standardised
    ones, lr chosen on a balanced fifth held out, refitted on all, the standardisation folded in."""
    mean, std = feature_stats(feats)  # (D,), (D,)
    x = (feats.float() - mean) / std  # (N, D), as standardize gives
    val = balanced_indices(labels, 0.2, seed, num_classes)  # (V,)
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    keep[val] = False
    epochs, batch = (100, 256) if labels.shape[0] > 2560 else (300, labels.shape[0])  # few images: full batch
    w, b = fit_linear_heads(x[keep], labels[keep], num_classes, DEFAULT_LRS, epochs, batch, seed=seed)
    lr = DEFAULT_LRS[int(heads_accuracy(w, b, x[val], labels[val])[0].argmax())]
    w, b = fit_linear_heads(x, labels, num_classes, (lr,), epochs, batch, seed=seed)  # (1, D, C), (1, C)
    head = nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_((w[0] / std[:, None]).T)  # (C, D): x W / std
        head.bias.copy_(b[0] - (mean / std) @ w[0])  # minus mean / std W
    return head


def param_groups(backbone: nn.Module, head: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Optimiser groups with an ``lr_scale``, no weight decay on biases, norms and tokens (1-D).

    A ViT (``blocks``) gets MAE's layer-wise decay: with L blocks, the patch embedding and the
    tokens are layer 0, block i is layer i + 1, the rest (final norm) and the head layer L + 1, and
    layer l's lr is scaled by ``layer_decay ** (L + 1 - l)`` (MAE's ``param_groups_lrd``; timm's
    ``param_groups_layer_decay`` gives the last block the head's scale instead). Other backbones: 1.
    """
    blocks = getattr(backbone, "blocks", None)
    depth = len(blocks) if isinstance(blocks, nn.Sequential) and cfg.layer_decay < 1 else None

    def layer(name: str) -> int:
        if depth is None:
            return 0
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            scale = 1.0 if depth is None else cfg.layer_decay ** (depth + 1 - layer(name))
            decay = 0.0 if p.ndim <= 1 or name.endswith(("token", "pos_embed")) else cfg.weight_decay
            groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": decay} for (scale, decay), ps in groups.items()] + [
        {"params": list(head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0}]


def finetune(
    cfg: Config, model: nn.Module, accelerator: Accelerator, train_data, train_labels: Tensor, test_data,
    num_classes: int, ft: FinetuneConfig, seed: int = 0, desc: str = "finetune",
) -> dict:
    """Fine-tune a copy of ``model`` with a linear head on ``train_data``; score it on ``test_data``.

    Args:
        cfg: the evaluation config (augment sizes and normalisation, eval.batch_size, precision).
        model: the feature network, (B, 3, H, W) -> (B, D); not modified.
        train_data: the labelled images (a dataset); train_labels (M,) their labels.
        test_data: the test split.
        ft: the fine-tuning settings.
        seed: the head's probe, the batch order and the augmentation draws.

    Returns:
        ``{"top1", "top5", "probe_top1", "steps", "images", "seconds"}``: probe_top1 is the starting
        head on the frozen network (LP-FT's starting point), on the test split.
    """
    torch.manual_seed(seed)
    backbone = copy.deepcopy(accelerator.unwrap_model(model))
    transform = clean_transform(cfg)
    test_batches = clean_batches(cfg, accelerator, test_data)
    if ft.head_init == "probe":
        feats, labels = extract_features(backbone, clean_batches(cfg, accelerator, train_data), transform, accelerator)
        head = probe_head(feats.cpu(), labels.cpu(), num_classes, seed)
    else:
        head = nn.Linear(backbone.num_features, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    net = nn.Sequential(backbone, head).to(accelerator.device)
    probe_top1 = _accuracy(net, test_batches, transform, accelerator)[0] if ft.head_init == "probe" else None

    world = accelerator.num_processes
    per_process = max(1, ft.batch_size // world)
    batches = make_batches(train_data, per_process, shuffle=True, drop_last=len(train_labels) >= ft.batch_size,
                           seed=seed, rank=accelerator.process_index, world_size=world, device=accelerator.device,
                           num_workers=cfg.data.num_workers)
    steps_per_epoch = len(batches)
    total = max(ft.epochs * steps_per_epoch, ft.min_steps)
    warmup = int(ft.warmup_fraction * total)
    lr = ft.lr * per_process * world / 256
    groups = param_groups(backbone, head, ft)
    optimizer = (torch.optim.AdamW(groups, lr=lr) if ft.optimizer == "adamw"
                 else torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True))
    lrs = [cosine(step, total, lr, 0.0, warmup) for step in range(total)]  # schedules computed up front
    augment = create_augment(augment_config("finetune", size=cfg.augment.size, mean=cfg.augment.mean,
                                            std=cfg.augment.std, scale=(ft.min_scale, 1.0))).to(accelerator.device)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    net, optimizer = accelerator.prepare(net, optimizer)
    net.train()
    if ft.freeze_bn_stats:
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    bar = tqdm(total=total * per_process * world, unit="img", unit_scale=True, dynamic_ncols=True, desc=desc,
               disable=not (cfg.train.progress and accelerator.is_main_process))
    start, step, epoch = time.perf_counter(), 0, 0
    while step < total:
        batches.set_epoch(epoch)
        for batch in batches:
            if step == total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lrs[step] * group["lr_scale"]
            images, targets = batch
            x = augment(images, generator, (accelerator.process_index, world), getattr(batch, "sizes", None))[0]
            with accelerator.autocast():
                loss = F.cross_entropy(net(x).float(), targets, label_smoothing=ft.label_smoothing)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(images.shape[0] * world)
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - start
    net = accelerator.unwrap_model(net)
    top1, top5 = _accuracy(net, test_batches, transform, accelerator)
    accelerator.free_memory()
    return {"top1": top1, "top5": top5, "probe_top1": probe_top1, "steps": total, "images": len(train_labels),
            "seconds": seconds}


def _accuracy(net: nn.Module, batches, transform, accelerator: Accelerator) -> tuple[float, float]:
    """Top-1/top-5 of a classifier (B, 3, H, W) -> (B, C) logits on clean batches, over every process."""
    logits, labels = extract_features(net, batches, transform, accelerator)  # (Q, C), (Q,)
    return topk_accuracy(logits, labels)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-fraction", dest="label_fractions", type=float, nargs="+", default=[1.0], metavar="F",
                   help="fine-tune on class-balanced fractions of the labels, e.g. 0.01 0.1 1 (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="one draw and run per seed (default: 0 1 2 for fractions below 1, else 0)")
    for key, default in FinetuneConfig().model_dump().items():
        # numbers parse here; words (adamw, probe, true/false) are validated by FinetuneConfig
        kind = str if isinstance(default, (bool, str)) else type(default)
        shown = str(default).lower() if isinstance(default, bool) else default
        p.add_argument(f"--{key.replace('_', '-')}", dest=f"ft_{key}", default=None, type=kind,
                       metavar=key.upper(), help=f"default {shown}")


def _summary(r: dict) -> str:
    return "  ".join(f"{100 * float(f):g}% of labels {x['mean_top1']:.4f} +- {x['std_top1']:.4f}"
                     for f, x in r["fractions"].items())


@register_protocol(
    "finetune", "fine-tune the backbone with a linear head (LP-FT) on all or class-balanced fractions of the labels",
    summary=_summary, headline=lambda r: {f"finetune {100 * float(f):g}%": x["mean_top1"]
                                          for f, x in r["fractions"].items()},
    arguments=_arguments,
)
def finetune_protocol(
    cfg: Config, model: nn.Module, accelerator: Accelerator, label_fractions: Sequence[float] = (1.0,),
    seeds: Optional[Sequence[int]] = None, **settings,
) -> dict:
    """:func:`finetune` once per fraction and seed; ``settings``: FinetuneConfig keys (``ft_<key>``
    from the command line; None keeps the default).

    Returns:
        ``{"settings", "fractions": {F: {"mean_top1", "std_top1", "runs": [...]}}}``; top1/top5 of
        the first fraction's first run too.
    """
    given = {key.removeprefix("ft_"): value for key, value in settings.items() if value is not None}
    ft = validate(FinetuneConfig, given, prefix="finetune")
    for fraction in label_fractions:
        check_fraction(fraction)
    train, test = clean_splits(cfg)
    labels = train.labels.cpu()  # (N,)
    fractions = {}
    for fraction in label_fractions:
        runs = []
        for seed in seeds if seeds is not None else ([0] if fraction == 1 else [0, 1, 2]):
            idx = balanced_indices(labels, fraction, seed, train.num_classes)  # (M,): all of them at 1
            data = train if fraction == 1 else train.subset(idx.numpy())  # (no copy of the whole split)
            r = finetune(cfg, model, accelerator, data, labels[idx], test, train.num_classes, ft, seed,
                         desc=f"finetune {100 * fraction:g}% seed {seed}")
            runs.append({"seed": seed, **r})
        fractions[fraction] = mean_and_spread(runs)
    first = next(iter(fractions.values()))["runs"][0]
    return {"top1": first["top1"], "top5": first["top5"], "settings": ft.model_dump(), "fractions": fractions}
