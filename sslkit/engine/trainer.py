"""The training loop, top to bottom.

``train(cfg)``: set up Accelerate, data, views, method and optimiser; score the untrained
network with k-NN; then per epoch: one pass of optimiser steps (logging loss, lr, img/s and
the online probe every ``log_every_steps``, collapse monitors every ``collapse_every_steps``),
k-NN when due, a checkpoint; finally export the backbone. What varies between methods lives
in the method (``ssl_step(views) -> (loss, features)``, ``before_optimizer_step``,
``after_optimizer_step``) and its augment preset.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from sslkit.augment import create_augment
from sslkit.config import Config, TrainConfig, save_config
from sslkit.data import ImageData, load_dataset, make_batches
from sslkit.engine.checkpoint import export_backbone, last_checkpoint, save_checkpoint
from sslkit.engine.compile import compile_networks
from sslkit.engine.guards import NonFiniteGuard, nonfinite_gradients, sigterm_flag
from sslkit.engine.optim import create_optimizer, create_scheduler, step_unless_found_inf, supports_found_inf
from sslkit.engine.run_dir import MetricsLog, check_same_model, prepare_run_dir
from sslkit.eval import CollapseMonitor, KNNMonitor
from sslkit.eval.clean import clean_batches, clean_splits, clean_transform
from sslkit.methods import Method, create_method
from sslkit.models import convert_sync_batchnorm


class TrainState:
    """Counters and the augmentation RNG, saved with every checkpoint."""

    def __init__(self, generator: torch.Generator) -> None:
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps completed
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "augment_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.generator.set_state(state["augment_rng"])


def create_accelerator(cfg: TrainConfig, run_dir: Path | None = None) -> Accelerator:
    """``cfg.trackers`` write under ``run_dir/trackers`` (e.g. TensorBoard event files)."""
    # Without CUDA, Accelerate only joins several launched processes (gloo) when told cpu=True.
    return Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.precision,
        log_with=list(cfg.trackers) or None, project_dir=None if run_dir is None else str(run_dir / "trackers"),
    )


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}``, lists and mappings as text: what trackers' hyper-parameter tables take."""
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            if value is not None:
                flat[f"{section}.{key}" if key else section] = (
                    value if isinstance(value, (bool, int, float, str)) else str(value))
    return flat


def per_process_batch(cfg: TrainConfig, world_size: int) -> int:
    """``train.batch_size`` is global: it is split over processes and accumulation steps."""
    parts = world_size * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} is not divisible by processes x grad_accum_steps "
            f"= {world_size} x {cfg.grad_accum_steps}; pick a multiple of {parts}."
        )
    return cfg.batch_size // parts


def knn_monitor(cfg: Config, accelerator: Accelerator, bank: Any = None) -> KNNMonitor:
    """k-NN on clean views: the train split (``bank``, if already loaded) against the test split."""
    bank, test = clean_splits(cfg, bank)
    return KNNMonitor(
        clean_batches(cfg, accelerator, bank), clean_batches(cfg, accelerator, test), clean_transform(cfg),
        bank.num_classes, cfg.eval.knn_k, cfg.eval.knn_temperature, ks=cfg.eval.knn_ks,
    )


def skips_on_device(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> bool:
    """Whether a step is skipped on the device (``found_inf``) rather than after reading ``flag``:
    on an accelerator, where the optimiser can. On the CPU the read is free (its ops have run)
    and not stepping at all beats a masked step."""
    return flag.device.type != "cpu" and supports_found_inf(optimizer)


def optimizer_step(
    cfg: Config, accelerator: Accelerator, model: torch.nn.Module, method: Method, optimizer: torch.optim.Optimizer,
) -> torch.Tensor:
    """Clip, let the method adjust the gradients, step and update its momentum encoder.

    Returns a 0-d float tensor on the device, 1 where the step was skipped because a gradient was
    not finite, without reading it on an accelerator: the optimiser skips on the device
    (``found_inf``, as under a grad scaler) and the momentum update is scaled by ``1 - skipped``.
    """
    norm = None
    if cfg.optim.clip_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
    method.before_optimizer_step()
    if cfg.train.max_nonfinite_steps <= 0:
        optimizer.step()
        skipped = torch.zeros((), device=accelerator.device)
    else:
        skipped = nonfinite_gradients(model.parameters(), norm)
        if cfg.train.precision == "fp16":
            # fp16's GradScaler skips overflowing steps itself (and must see them to lower its
            # scale); the flag above, on the scaled gradients, is its own test.
            optimizer.step()
        elif skips_on_device(optimizer, skipped):
            step_unless_found_inf(optimizer, skipped)
        elif not skipped.item():
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_optimizer_step(1 - skipped)
    return skipped


def train(cfg: Config) -> dict[str, float]:
    """Run a recipe; returns the last logged metrics (loss, knn_top1, ...)."""
    run_dir = Path(cfg.train.output_dir) / (cfg.train.name or "run")
    accelerator = create_accelerator(cfg.train, run_dir)
    ckpt_root = run_dir / "checkpoints"
    set_seed(cfg.train.seed)  # the same initial weights in every process
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    # Data: uint8 batches on the device; every process draws its slice of the same global batch.
    data = load_dataset(cfg.data, "train")
    if isinstance(data, ImageData):
        data = data.to(device)  # one device copy serves training and the k-NN bank
    batches = make_batches(
        data, per_process_batch(cfg.train, world), shuffle=True, drop_last=True,
        seed=cfg.train.seed, rank=rank, world_size=world, device=device, num_workers=cfg.data.num_workers,
    )
    accum = cfg.train.grad_accum_steps
    steps_per_epoch = len(batches) // accum
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    # Method, views, optimiser. The augmentation RNG is seeded alike in every process.
    method = create_method(cfg, data.num_classes if cfg.eval.online_probe else None)
    if cfg.model.sync_batchnorm:  # the same weights and keys; statistics over the global batch
        method = convert_sync_batchnorm(method)
    method = method.to(device)
    compiled = cfg.train.compile and compile_networks(method.compile_targets(), device)
    augment = create_augment(cfg.augment).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    method.generator, method.shard = generator, (rank, world)
    probe_groups = [] if method.online_probe is None else [
        {"params": list(method.online_probe.parameters()), "lr": cfg.eval.online_lr, "weight_decay": 0.0}
    ]
    optimizer = create_optimizer(method, cfg.optim, cfg.train.batch_size, probe_groups)
    # The run directory is touched only now that bad data or settings would have failed.
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, cfg)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if cfg.train.trackers:
        accelerator.init_trackers(cfg.train.name or "run", config=flat_config(cfg),
                                  init_kwargs={"wandb": {"dir": str(run_dir / "trackers")}})
    scheduler = create_scheduler(optimizer, cfg.optim, steps_per_epoch, total_steps)
    model, optimizer = accelerator.prepare(method, optimizer)
    state = TrainState(generator)
    accelerator.register_for_checkpointing(scheduler, state)
    if cfg.resume:
        ckpt = last_checkpoint(ckpt_root)
        check_same_model(ckpt, cfg)
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} (epoch {state.epoch}, step {state.step})")

    log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process,
                     accelerator if cfg.train.trackers else None)
    if cfg.resume and accelerator.is_main_process:
        log.rewind(state.step)  # what was logged after the checkpoint will be logged again
    knn = knn_monitor(cfg, accelerator, data) if cfg.eval.knn else None
    last: dict[str, Any] = {}

    def evaluate(label: str) -> None:
        scores = knn(method.feature_model(), accelerator)
        last.update(scores)
        log.write(step=state.step, epoch=state.epoch, **scores)
        accelerator.print(f"k-NN {label}: top-1 {scores['knn_top1']:.4f}  top-5 {scores['knn_top5']:.4f}")

    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, cfg.train.precision, ckpt_root)

    def check_nonfinite() -> None:
        """Read the skip flags of the steps since the last check (raises after too many in a row)."""
        guard.check(lambda step, total: log.write(step=step, epoch=(step - 1) // steps_per_epoch,
                                                  event="nonfinite_step", nonfinite_steps=total))

    def checkpoint(tag: str) -> None:
        check_nonfinite()  # nothing is saved after the first bad step of a run that fails
        save_checkpoint(accelerator, cfg, ckpt_root, tag, cfg.train.keep_checkpoints)

    if knn is not None and cfg.eval.at_start and state.step == 0:
        evaluate("untrained network")
    log.write(step=state.step, epoch=state.epoch, event="resume" if cfg.resume else "start", world_size=world,
              total_steps=total_steps, batch_size=cfg.train.batch_size, compiled=compiled)

    bar = tqdm(total=total_steps * cfg.train.batch_size, initial=state.step * cfg.train.batch_size,
               unit="img", unit_scale=True, dynamic_ncols=True,
               disable=not (cfg.train.progress and accelerator.is_main_process))
    channels_last = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    collapse = CollapseMonitor()
    online = torch.zeros(2, device=device)  # online-probe hits and samples since the last log
    bad_before = 0  # batches.bad_images at the start of the epoch
    window_start, window_step = time.perf_counter(), state.step
    with sigterm_flag() as sigterm:
        for epoch in range(state.epoch, cfg.train.epochs):
            if state.step >= total_steps:
                break
            bar.set_description(f"epoch {epoch + 1}/{cfg.train.epochs}")
            first = state.step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
            batches.set_epoch(epoch, start=first * accum)
            model.train()
            micro_batches = iter(batches)
            epoch_start, epoch_first_step = time.perf_counter(), state.step
            for _ in range(first, steps_per_epoch):
                if state.step >= total_steps:
                    break
                method.set_progress(state.step, steps_per_epoch, total_steps)
                step_loss = torch.zeros((), device=device)
                for micro in range(accum):
                    images, labels = next(micro_batches)  # (b, C, H, W) uint8, (b,)
                    views = [v.contiguous(memory_format=channels_last)
                             for v in augment(images, generator, (rank, world))]
                    # Gradients are averaged across processes only on the last micro-batch.
                    with nullcontext() if micro == accum - 1 else accelerator.no_sync(model):
                        out = model(views, labels)
                        accelerator.backward(out["loss"] / accum)
                    step_loss += out["ssl_loss"] / accum
                    if "online_correct" in out:
                        online[0] += out["online_correct"]
                        online[1] += len(labels)
                skipped = optimizer_step(cfg, accelerator, model, method, optimizer)
                scheduler.step()  # a skipped step still uses up its batch and its place in the schedule
                state.step += 1
                bar.update(cfg.train.batch_size)
                guard.record(state.step, skipped)

                if cfg.eval.collapse_every_steps and state.step % cfg.eval.collapse_every_steps == 0:
                    stats = collapse(out["features"])  # this process's last micro-batch
                    log.write(step=state.step, epoch=epoch, **stats)
                stop = sigterm() if world == 1 else False
                if state.step % cfg.train.log_every_steps == 0 or state.step == total_steps:
                    # The hot path's only host reads, every log_every_steps: loss, probe, the steps'
                    # non-finite flags. SIGTERM is agreed on here under several processes.
                    flag = torch.tensor([float(sigterm())], device=device)
                    reduced = accelerator.reduce(torch.cat([step_loss[None], online, flag]), "sum").tolist()
                    check_nonfinite()
                    loss, correct, seen, terminated = reduced
                    stop = stop or terminated > 0
                    online.zero_()
                    now = time.perf_counter()
                    metrics = {
                        "loss": loss / world,
                        "lr": scheduler.get_last_lr()[0],
                        "img_per_s": round((state.step - window_step) * cfg.train.batch_size / (now - window_start), 1),
                        **({"online_top1": correct / seen} if seen else {}),
                        **({"nonfinite_steps": guard.total} if guard.total else {}),
                    }
                    window_start, window_step = now, state.step
                    last.update(metrics)
                    log.write(step=state.step, epoch=epoch, **metrics)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k != "img_per_s"})
                if stop:
                    checkpoint(f"epoch_{epoch:04d}_step_{state.step:08d}")
                    log.write(step=state.step, epoch=epoch, event="sigterm")
                    accelerator.print(f"SIGTERM: saved a checkpoint at step {state.step} and stopped; "
                                      "continue with resume=true")
                    bar.close()
                    accelerator.end_training()
                    return last
                if (cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0
                        and state.step < min(total_steps, (epoch + 1) * steps_per_epoch)):
                    checkpoint(f"epoch_{epoch:04d}_step_{state.step:08d}")  # mid-epoch; epoch ends save below

            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - epoch_start
            # undecodable images replaced this epoch (data.bad_images=skip), over all processes
            bad_images = int(accelerator.reduce(torch.tensor([batches.bad_images - bad_before], device=device),
                                                "sum").item())
            bad_before = batches.bad_images
            log.write(step=state.step, epoch=epoch, event="epoch_end", train_seconds=round(epoch_seconds, 3),
                      epoch_img_per_s=round((state.step - epoch_first_step) * cfg.train.batch_size / epoch_seconds, 1),
                      **({"bad_images": bad_images} if bad_images else {}))
            state.epoch = epoch + 1
            if knn is not None and (state.epoch % cfg.eval.every_epochs == 0 or state.step >= total_steps):
                evaluate(f"after epoch {state.epoch}")
            if state.epoch % cfg.train.checkpoint_every_epochs == 0 or state.step >= total_steps:
                checkpoint(f"epoch_{state.epoch:04d}")
            window_start = time.perf_counter()  # evaluation and saving are not training time
    bar.close()

    if accelerator.is_main_process:
        export_backbone(accelerator.unwrap_model(model), cfg, run_dir / "backbone.safetensors")
        log.write(step=state.step, epoch=state.epoch, event="end")
    accelerator.print(f"run directory: {run_dir} (metrics.jsonl, checkpoints/last, backbone.safetensors)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last
