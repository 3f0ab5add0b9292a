"""sslkit's SimCLR, BYOL, DINO, SimSiam, SwAV, NNCLR and MoCo v2 against lightly's, same backbone,
batch, optimiser, epochs and seed.

lightly's side is the way its docs and examples train each method: PIL images through the
method's lightly transform (``SimCLRTransform``, ``BYOLTransform``, ``DINOTransform``,
``SwaVTransform``) in DataLoader workers, lightly's heads, losses, memory banks
(``NNMemoryBankModule``, ``NTXentLoss(memory_bank_size=...)``) and momentum utilities, a plain
torch loop.
sslkit's side is ``sslkit.engine.train`` (uint8 data on the device, batched views).
Both use the same optimiser and schedules (sslkit's, from the recipe) and both are scored by
the same k-NN (sslkit's KNNMonitor, clean test images against the clean train split) of the
same network: the backbone for SimCLR, SimSiam, SwAV, NNCLR and MoCo v2 (the query encoder), the
online backbone for BYOL, the teacher's for DINO.

    python benchmarks/compare_lightly.py --small                 # every method, 20k images, 1 epoch
    python benchmarks/compare_lightly.py --small --method byol   # one method (a key of RECIPES)
    python benchmarks/compare_lightly.py                         # each recipe's full budget
    python benchmarks/compare_lightly.py recipes/simclr_fashion_mnist.yaml train.epochs=10

Without a recipe, each method runs its Fashion-MNIST recipe (``RECIPES``); with one, its
``method.name`` picks lightly's side.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    DINOProjectionHead,
    MoCoProjectionHead,
    NNCLRPredictionHead,
    NNCLRProjectionHead,
    NNMemoryBankModule,
    SimCLRProjectionHead,
    SimSiamPredictionHead,
    SimSiamProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    DINOTransform,
    SimCLRTransform,
    SwaVTransform,
)
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import Tensor, nn

from sslkit.augment import create_augment
from sslkit.config import AugmentConfig, Config, load_config
from sslkit.data import load_dataset
from sslkit.engine import read_metrics, train
from sslkit.engine.optim import create_optimizer, optim_schedules, set_schedules
from sslkit.engine.trainer import knn_monitor
from sslkit.losses import teacher_temperature
from sslkit.schedules import at_step
from sslkit.models import create_backbone

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "simclr": ROOT / "recipes" / "quickstart.yaml",
    "byol": ROOT / "recipes" / "byol_fashion_mnist.yaml",
    "dino": ROOT / "recipes" / "dino_fashion_mnist.yaml",
    "simsiam": ROOT / "recipes" / "simsiam_fashion_mnist.yaml",
    "swav": ROOT / "recipes" / "swav_fashion_mnist.yaml",
    "nnclr": ROOT / "recipes" / "nnclr_fashion_mnist.yaml",
    "mocov2": ROOT / "recipes" / "mocov2_fashion_mnist.yaml",
}
# Small mode: each method's recipe on a 20k-image subset, one epoch.
SMALL = ["train.epochs=1", "data.train_limit=20000", "eval.bank_limit=20000", "eval.test_limit=5000"]

Transform = Callable[[Image.Image], list[Tensor]]


class PILViews(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images as RGB PIL images through a lightly multi-view transform."""

    def __init__(self, images: Tensor, transform: Transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[Tensor]:
        image = self.images[i]
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
        return self.transform(pil)


def require(condition: bool, what: str) -> None:
    """Stop when the recipe asks for something lightly's module of the method cannot build."""
    if not condition:
        raise ValueError(f"lightly's side cannot follow this recipe: {what}")


def view_settings(cfg: Config) -> list[AugmentConfig]:
    """The settings of each of sslkit's views, the preset's per-view blur and solarisation
    applied: lightly's transforms copy these, so both sides augment alike by construction."""
    return [pipeline.cfg for pipeline in create_augment(cfg.augment).pipelines]


def shared_kwargs(v: AugmentConfig, cj_strength: float = 1.0) -> dict:
    """The arguments every lightly view transform takes, from one sslkit view's settings.

    lightly multiplies each jitter strength by ``cj_strength``; the values are divided by it so
    the product is the recipe's.
    """
    require(tuple(v.ratio) == (3 / 4, 4 / 3), f"its crops have aspect ratio 3/4-4/3, the recipe's {v.ratio}")
    return dict(
        cj_prob=v.jitter_prob, cj_strength=cj_strength, cj_bright=v.brightness / cj_strength,
        cj_contrast=v.contrast / cj_strength, cj_sat=v.saturation / cj_strength, cj_hue=v.hue / cj_strength,
        random_gray_scale=v.gray_prob, sigmas=v.blur_sigma, hf_prob=v.hflip_prob,
        normalize={"mean": list(v.mean), "std": list(v.std)},
    )


def two_view_kwargs(v: AugmentConfig) -> dict:
    """SimCLR's and BYOL's transforms: crops of scale [min_scale, 1] only."""
    require(v.scale[1] == 1.0, f"SimCLR's and BYOL's transforms crop up to scale 1, the recipe to {v.scale[1]}")
    return dict(input_size=v.size, min_scale=v.scale[0], gaussian_blur=v.blur_prob, **shared_kwargs(v))


def byol_transform(cfg: Config) -> Transform:
    """lightly's BYOLTransform with each of sslkit's two views' settings (the ``byol`` preset)."""
    v0, v1 = view_settings(cfg)
    return BYOLTransform(
        BYOLView1Transform(solarization_prob=v0.solarize_prob, **two_view_kwargs(v0)),
        BYOLView2Transform(solarization_prob=v1.solarize_prob, **two_view_kwargs(v1)),
    )


def simclr_transform(cfg: Config) -> Transform:
    """lightly's SimCLRTransform: two views alike (the ``simclr`` preset)."""
    v0, v1 = view_settings(cfg)
    require(v0 == v1, "SimCLRTransform makes two views alike")
    return SimCLRTransform(**two_view_kwargs(v0))


class LightlyMethod(nn.Module):
    """lightly's side of one method: its transform, its modules, one training step, and the
    hooks around the optimiser step (as a Lightning module of lightly's examples would)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg.model)

    @staticmethod
    def transform(cfg: Config) -> Transform:
        raise NotImplementedError

    def training_step(self, views: list[Tensor], step: int, steps_per_epoch: int, total_steps: int) -> Tensor:
        """views: V x (B, 3, h, w) -> scalar loss; ``step`` counts optimiser steps done."""
        raise NotImplementedError

    def before_optimizer_step(self, epoch: int) -> None:
        """After backward, before the optimiser uses the gradients."""

    def feature_model(self) -> nn.Module:
        """The network k-NN evaluates (sslkit's Method.feature_model counterpart)."""
        return self.backbone


class LightlySimCLR(LightlyMethod):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        self.projection_head = SimCLRProjectionHead(
            self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers, m.proj_batch_norm
        )
        self.criterion = NTXentLoss(temperature=m.temperature)

    @staticmethod
    def transform(cfg: Config) -> Transform:
        return simclr_transform(cfg)

    def training_step(self, views: list[Tensor], step: int, steps_per_epoch: int, total_steps: int) -> Tensor:
        x0, x1 = views
        return self.criterion(self.projection_head(self.backbone(x0)), self.projection_head(self.backbone(x1)))


class LightlyBYOL(LightlyMethod):
    """lightly's BYOL example: online backbone + projector + predictor, a deep-copied EMA
    target, ``cosine_schedule`` momentum updated at the start of each step."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        require(m.proj_layers == 2 and m.pred_layers == 2 and m.proj_batch_norm,
                "BYOL's heads are two layers with BatchNorm")
        self.projection_head = BYOLProjectionHead(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim)
        self.prediction_head = BYOLPredictionHead(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    @staticmethod
    def transform(cfg: Config) -> Transform:
        return byol_transform(cfg)

    def training_step(self, views: list[Tensor], step: int, steps_per_epoch: int, total_steps: int) -> Tensor:
        m = self.cfg.method
        momentum = cosine_schedule(step, total_steps, m.momentum_base, m.momentum_end)
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        x0, x1 = views
        p0, p1 = (self.prediction_head(self.projection_head(self.backbone(x))) for x in (x0, x1))
        with torch.no_grad():
            z0, z1 = (self.projection_head_momentum(self.backbone_momentum(x)) for x in (x0, x1))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class LightlyDINO(LightlyMethod):
    """lightly's DINO example: student backbone + ``DINOProjectionHead`` (last layer frozen for
    the first epochs), an EMA teacher on the two global views, ``DINOLoss``."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        require(m.proj_layers == 3, "DINOProjectionHead has three layers before its last one")
        require(float(m.freeze_last_layer_epochs).is_integer(), "freeze_last_layer counts whole epochs")
        head_args = (self.backbone.num_features, m.proj_hidden_dim, m.bottleneck_dim, m.proj_output_dim,
                     m.proj_batch_norm)
        self.student_head = DINOProjectionHead(
            *head_args, freeze_last_layer=int(m.freeze_last_layer_epochs), norm_last_layer=m.norm_last_layer
        )
        # lightly's head uses torch's old weight_norm, which cannot be deep-copied (its weight is
        # a non-leaf tensor from construction on): build the teacher's head anew and load the
        # student's weights, as DINO's code does, so both start equal like sslkit's.
        self.teacher_head = DINOProjectionHead(*head_args, norm_last_layer=m.norm_last_layer)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.teacher_backbone = copy.deepcopy(self.backbone)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=m.proj_output_dim, warmup_teacher_temp=m.warmup_teacher_temp, teacher_temp=m.teacher_temp,
            student_temp=m.student_temp, center_momentum=m.center_momentum,
        )

    @staticmethod
    def transform(cfg: Config) -> Transform:
        a = cfg.augment
        views = view_settings(cfg)
        g0, g1 = views[:2]
        local = views[2] if a.local_crops else g0
        require(g0.solarize_prob == 0 and local.solarize_prob == 0,
                "DINOTransform solarises only the second global view")
        require(all(shared_kwargs(v) == shared_kwargs(g0) for v in views), "DINOTransform's views share jitter")
        return DINOTransform(
            global_crop_size=a.size, global_crop_scale=a.scale, local_crop_size=a.local_size,
            local_crop_scale=a.local_scale, n_local_views=a.local_crops,
            gaussian_blur=(g0.blur_prob, g1.blur_prob, local.blur_prob), solarization_prob=g1.solarize_prob,
            # DINOTransform's second global view ignores cj_strength and keeps its default 0.5: pass
            # 0.5 and doubled strengths so every view gets the recipe's jitter
            **shared_kwargs(g0, cj_strength=0.5),
        )

    def training_step(self, views: list[Tensor], step: int, steps_per_epoch: int, total_steps: int) -> Tensor:
        m = self.cfg.method
        momentum = cosine_schedule(step, total_steps, m.momentum_base, m.momentum_end)
        update_momentum(self.backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher_backbone(x)) for x in views[:2]]
        student_out = [self.student_head(self.backbone(x)) for x in views]
        # DINOLoss's own warm-up steps per whole epoch; the recipe's is per step (sslkit's schedule)
        temp = teacher_temperature(step / steps_per_epoch, m.teacher_temp, m.warmup_teacher_temp,
                                   m.warmup_teacher_temp_epochs)
        return self.criterion(teacher_out, student_out, teacher_temp=temp)

    def before_optimizer_step(self, epoch: int) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=epoch)

    def feature_model(self) -> nn.Module:
        return self.teacher_backbone


class LightlySimSiam(LightlyMethod):
    """lightly's SimSiam example: ``SimSiamProjectionHead`` (3 layers), ``SimSiamPredictionHead``,
    negative cosine similarity with the projections detached."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        require(m.proj_layers == 3 and m.proj_batch_norm, "SimSiamProjectionHead is three layers with BatchNorm")
        self.projection_head = SimSiamProjectionHead(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim)
        self.prediction_head = SimSiamPredictionHead(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim)
        self.criterion = NegativeCosineSimilarity()

    @staticmethod
    def transform(cfg: Config) -> Transform:
        return byol_transform(cfg)

    def training_step(self, views: list[Tensor], step: int, steps_per_epoch: int, total_steps: int) -> Tensor:
        z0, z1 = (self.projection_head(self.backbone(x)) for x in views)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))


class LightlySwAV(LightlyMethod):
    """lightly's SwAV example and ImageNet benchmark: ``SwaVProjectionHead``, ``SwaVPrototypes``
    normalised before each step and frozen for the first epoch(s), ``SwaVLoss``, each crop
    through the network on its own."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        require(m.proj_layers == 2 and m.proj_batch_norm, "SwaVProjectionHead is two layers with BatchNorm")
        require(float(m.freeze_prototypes_epochs).is_integer(), "the prototypes freeze for whole epochs")
        require(m.queue_length == 0, "this loop has no SwAV queue")
        self.projection_head = SwaVProjectionHead(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim)
        self.prototypes = SwaVPrototypes(m.proj_output_dim, m.prototypes,
                                         n_steps_frozen_prototypes=int(m.freeze_prototypes_epochs))
        self.criterion = SwaVLoss(m.temperature, m.sinkhorn_iterations, m.sinkhorn_epsilon)

    @staticmethod
    def transform(cfg: Config) -> Transform:
        a = cfg.augment
        views = view_settings(cfg)
        require(all(shared_kwargs(v) == shared_kwargs(views[0]) for v in views), "SwaVTransform's views share jitter")
        require(all(v.solarize_prob == 0 for v in views), "SwaVTransform does not solarise")
        require(all(v.blur_prob == views[0].blur_prob for v in views), "SwaVTransform's views share blur")
        kwargs = shared_kwargs(views[0])
        return SwaVTransform(
            crop_sizes=(a.size, a.local_size), crop_counts=(2, a.local_crops),
            crop_min_scales=(a.scale[0], a.local_scale[0]), crop_max_scales=(a.scale[1], a.local_scale[1]),
            gaussian_blur=views[0].blur_prob, **kwargs,
        )

    def training_step(self, views: list[Tensor], step: int, steps_per_epoch: int, total_steps: int) -> Tensor:
        self.prototypes.normalize()
        epoch = step // steps_per_epoch
        scores = [self.prototypes(F.normalize(self.projection_head(self.backbone(x)), dim=1), step=epoch)
                  for x in views]
        return self.criterion(scores[:2], scores[2:])


class LightlyNNCLR(LightlyMethod):
    """lightly's NNCLR example: ``NNCLRProjectionHead``, ``NNCLRPredictionHead``,
    ``NNMemoryBankModule`` (the first view looked up, the second looked up and enqueued),
    ``NTXentLoss``."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        require(m.proj_layers == 3 and m.proj_batch_norm, "NNCLRProjectionHead is three layers with BatchNorm")
        self.projection_head = NNCLRProjectionHead(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim)
        self.prediction_head = NNCLRPredictionHead(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim)
        self.memory_bank = NNMemoryBankModule(size=(m.support_set_size, m.proj_output_dim))
        self.criterion = NTXentLoss(temperature=m.temperature)

    @staticmethod
    def transform(cfg: Config) -> Transform:
        return byol_transform(cfg)

    def training_step(self, views: list[Tensor], step: int, steps_per_epoch: int, total_steps: int) -> Tensor:
        z0, z1 = (self.projection_head(self.backbone(x)) for x in views)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        n0 = self.memory_bank(z0.detach(), update=False)
        n1 = self.memory_bank(z1.detach(), update=True)
        return 0.5 * (self.criterion(n0, p1) + self.criterion(n1, p0))


class LightlyMoCoV2(LightlyMethod):
    """lightly's MoCo example: ``MoCoProjectionHead``, deep-copied momentum encoders updated at
    the start of each step, ``NTXentLoss(memory_bank_size=...)`` (the keys enqueued after each
    loss); symmetric as lightly's CIFAR-10 benchmark when the recipe says so."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        self.projection_head = MoCoProjectionHead(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim,
                                                  m.proj_layers, m.proj_batch_norm)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=m.temperature, memory_bank_size=(m.queue_length, m.proj_output_dim))

    @staticmethod
    def transform(cfg: Config) -> Transform:
        return simclr_transform(cfg)

    def training_step(self, views: list[Tensor], step: int, steps_per_epoch: int, total_steps: int) -> Tensor:
        m = self.cfg.method
        momentum = cosine_schedule(step, total_steps, m.momentum_base, m.momentum_end)
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)

        def loss(x_query: Tensor, x_key: Tensor) -> Tensor:
            query = self.projection_head(self.backbone(x_query))
            with torch.no_grad():
                key = self.projection_head_momentum(self.backbone_momentum(x_key))
            return self.criterion(query, key)

        x0, x1 = views
        return 0.5 * (loss(x0, x1) + loss(x1, x0)) if m.symmetric else loss(x0, x1)


LIGHTLY: dict[str, type[LightlyMethod]] = {
    "simclr": LightlySimCLR, "byol": LightlyBYOL, "dino": LightlyDINO, "simsiam": LightlySimSiam,
    "swav": LightlySwAV, "nnclr": LightlyNNCLR, "mocov2": LightlyMoCoV2,
}


def run_lightly(cfg: Config, workers: int) -> dict[str, float]:
    set_seed(cfg.train.seed)
    data = load_dataset(cfg.data, "train")
    method = LIGHTLY[cfg.method.name]
    loader = torch.utils.data.DataLoader(
        PILViews(data.images, method.transform(cfg)), batch_size=cfg.train.batch_size, shuffle=True,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
    )
    model = method(cfg)
    optimizer = create_optimizer(model, cfg.optim, cfg.train.batch_size)  # momentum copies need no grad: left out
    total = cfg.train.epochs * len(loader)
    schedules = optim_schedules(cfg.optim, cfg.train.batch_size, len(loader), total)  # sslkit's lr, as in (a)
    step, images, seconds = 0, 0, 0.0
    for epoch in range(cfg.train.epochs):
        model.train()
        start = time.perf_counter()
        for views in loader:
            set_schedules(optimizer, at_step(schedules, step))
            loss = model.training_step(views, step, len(loader), total)
            loss.backward()
            model.before_optimizer_step(epoch)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            images += len(views[0])
        seconds += time.perf_counter() - start
    scores = knn_monitor(cfg, Accelerator(cpu=True))(model.feature_model())
    return {**scores, "img_per_s": images / seconds, "final_loss": loss.item()}


def run_sslkit(cfg: Config) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        cfg.train.output_dir, cfg.train.name = out, "sslkit"
        scores = train(cfg)
        epochs = [m for m in read_metrics(Path(out) / "sslkit") if m.get("event") == "epoch_end"]
    images = sum(m["epoch_img_per_s"] * m["train_seconds"] for m in epochs)
    seconds = sum(m["train_seconds"] for m in epochs)
    return {"knn_top1": scores["knn_top1"], "knn_top5": scores["knn_top5"], "img_per_s": images / seconds,
            "final_loss": scores["loss"]}


def compare(recipe: Path, overrides: list[str], workers: int) -> dict[str, dict[str, float]]:
    """Both sides of one recipe, each from a fresh config; prints their table."""
    name = load_config(recipe, overrides).method.name
    if name not in LIGHTLY:
        raise SystemExit(f"no lightly side for method '{name}' (have: {', '.join(LIGHTLY)})")
    print(f"\n== {name}: {recipe.name} {' '.join(overrides)}", flush=True)
    start = time.perf_counter()
    results = {
        "lightly": run_lightly(load_config(recipe, overrides), workers),
        "sslkit": run_sslkit(load_config(recipe, overrides)),
    }
    s, l = results["sslkit"], results["lightly"]
    print(f"\n{name:10}{'k-NN top-1':>12}{'k-NN top-5':>12}{'train img/s':>14}{'final loss':>12}")
    for side, r in results.items():
        print(f"{side:10}{r['knn_top1']:12.4f}{r['knn_top5']:12.4f}{r['img_per_s']:14.1f}{r['final_loss']:12.4f}")
    print(f"sslkit - lightly k-NN top-1: {100 * (s['knn_top1'] - l['knn_top1']):+.2f} points; "
          f"sslkit / lightly img/s: {s['img_per_s'] / l['img_per_s']:.2f}x; "
          f"both sides {time.perf_counter() - start:.0f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=None,
                        help="one recipe to compare (its method.name picks lightly's side); default: --method's")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--method", choices=[*LIGHTLY, "all"], default="all",
                        help="without a recipe: which methods' Fashion-MNIST recipes to run (default all)")
    parser.add_argument("--small", action="store_true", help="20k images, one epoch: a few minutes per method")
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.recipe is not None and "=" in args.recipe and not Path(args.recipe).is_file():
        overrides.insert(0, args.recipe)  # an override, not a recipe
        args.recipe = None
    overrides = [*(SMALL if args.small else []), *overrides, "eval.at_start=false", "train.progress=false"]
    if args.recipe is not None:
        recipes = [Path(args.recipe)]
    else:
        recipes = list(RECIPES.values()) if args.method == "all" else [RECIPES[args.method]]

    results = {str(recipe): compare(recipe, overrides, args.workers) for recipe in recipes}
    if len(results) > 1:
        print(f"\n{'recipe':28}{'lightly top-1':>14}{'sslkit top-1':>14}{'difference':>12}{'img/s ratio':>13}")
        for recipe, r in results.items():
            s, l = r["sslkit"], r["lightly"]
            print(f"{Path(recipe).name:28}{l['knn_top1']:14.4f}{s['knn_top1']:14.4f}"
                  f"{100 * (s['knn_top1'] - l['knn_top1']):+11.2f}p{s['img_per_s'] / l['img_per_s']:12.2f}x")
    print(f"({torch.get_num_threads()} torch threads, {args.workers} lightly workers, torch {torch.__version__})")
    if args.output:
        Path(args.output).write_text(json.dumps({"overrides": overrides, "results": results}, indent=2))


if __name__ == "__main__":
    main()
