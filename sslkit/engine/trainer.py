"""The training loop, top to bottom (in the manner of DINO's ``main_dino.py`` and nanoGPT's
``train.py``).

``train(cfg)``: ``setup`` builds everything (Accelerate, data, method, views, optimiser, the
schedules of every step computed up front, the run directory, a resumed state); then one flat
loop over optimiser steps, the epoch derived from the step: ``train_step``, ``log_step`` every
``log_every_steps`` (the one place where the host reads the device), ``end_epoch`` (k-NN,
checkpoint) when an epoch's steps are done; ``teardown`` once. What varies between methods
lives in the method (``ssl_step(views) -> (loss terms, features)``, its ``schedules``,
``before_optimizer_step``, ``after_optimizer_step``) and its augment preset.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from sslkit.augment import MultiView, create_augment
from sslkit.config import Config, TrainConfig
from sslkit.data import Batches, ImageData, describe, describe_line, load_dataset, make_batches
from sslkit.engine.checkpoint import export_backbone, find_resumable, save_checkpoint
from sslkit.engine.compile import compile_networks
from sslkit.engine.guards import NonFiniteGuard, exit_with_launcher, nonfinite_gradients, sigterm_flag
from sslkit.engine.optim import (
    create_optimizer,
    optim_schedules,
    set_schedules,
    step_unless_found_inf,
    supports_found_inf,
)
from sslkit.engine.run_dir import MetricsLog, check_same_model, open_run_dir, run_path
from sslkit.errors import UserError
from sslkit.eval import CollapseMonitor, KNNMonitor
from sslkit.eval.clean import clean_batches, clean_splits, clean_transform, eval_data, no_labels_reason
from sslkit.methods import Method, create_method
from sslkit.models import convert_sync_batchnorm
from sslkit.schedules import Schedules, at_step


class TrainState:
    """The step counter and the augmentation RNG, saved with every checkpoint (the epoch and
    every schedule follow from the step)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.step = 0  # optimiser steps completed
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "augment_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.generator.set_state(state["augment_rng"])


def create_accelerator(cfg: TrainConfig, run_dir: Path | None = None) -> Accelerator:
    """``cfg.trackers`` write under ``run_dir/trackers`` (e.g. TensorBoard event files)."""
    # Accelerate keeps one state per process and refuses a second Accelerator with another
    # precision or device: forget the previous run's, so that train() may run again in this
    # process (a notebook, a sweep, the tests) with other settings. Rebuilt from the environment.
    AcceleratorState._reset_state(reset_partial_state=True)
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
        fix = f"pick a multiple of {parts}"
        if cfg.batch_size % cfg.grad_accum_steps == 0:  # a resumed run keeps its batch to keep its trajectory
            fix += f", or a number of processes that divides {cfg.batch_size // cfg.grad_accum_steps}"
        raise UserError(
            f"train.batch_size={cfg.batch_size} is not divisible by processes x grad_accum_steps "
            f"= {world_size} x {cfg.grad_accum_steps}; {fix}."
        )
    return cfg.batch_size // parts


def knn_monitor(cfg: Config, accelerator: Accelerator, bank: Any = None) -> KNNMonitor:
    """k-NN on clean views of the evaluation data: its train split (``bank``, if already loaded)
    against its test split."""
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


@dataclass
class Run:
    """Everything the loop's steps share, built by ``setup``."""

    cfg: Config
    accelerator: Accelerator
    run_dir: Path
    method: Method  # the bare method (hooks, feature model)
    model: torch.nn.Module  # the method as Accelerate wraps it (DDP)
    optimizer: torch.optim.Optimizer
    augment: MultiView
    batches: Batches
    state: TrainState
    schedules: Schedules  # name -> one value per step, computed up front
    steps_per_epoch: int
    total_steps: int
    compiled: bool
    log: MetricsLog
    guard: NonFiniteGuard
    knn: Optional[KNNMonitor]
    data_summary: dict[str, Any] = field(default_factory=dict)  # the start event's data_* keys
    bar: Any = None
    last: dict[str, Any] = field(default_factory=dict)  # the last logged metrics, returned by train()

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass
class Window:
    """What the loop accumulates on the device between two log steps (no host read)."""

    loss: torch.Tensor  # the last step's loss ...
    terms: dict[str, torch.Tensor]  # ... and its terms, by name
    online: torch.Tensor  # (2,) online-probe hits and samples since the last log
    start_time: float
    start_step: int
    features: Optional[torch.Tensor] = None  # the last micro-batch's backbone features (collapse monitor)


def setup(cfg: Config, held: ExitStack) -> Run:
    """Accelerate, data, method, views, optimiser, schedules, run directory, resumed state;
    ``held`` keeps what must last as long as the run: the run directory's lock."""
    run_dir = run_path(cfg)
    accelerator = create_accelerator(cfg.train, run_dir)
    set_seed(cfg.train.seed)  # the same initial weights in every process
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    # Data: uint8 batches on the device; every process draws its slice of the same global batch.
    data = load_dataset(cfg.data, "train")
    summary = describe(data, cfg.data)
    accelerator.print(f"data: {describe_line(summary, cfg.data)}")
    if isinstance(data, ImageData):
        data = data.to(device)  # one device copy serves training and the k-NN bank
    batches = make_batches(
        data, per_process_batch(cfg.train, world), shuffle=True, drop_last=True,
        seed=cfg.train.seed, rank=rank, world_size=world, device=device, num_workers=cfg.data.num_workers,
    )
    steps_per_epoch = len(batches) // cfg.train.grad_accum_steps
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    # What needs labels: the online probe those of the training data, k-NN those of eval.data.
    probe = cfg.eval.online_probe and data.num_classes > 0
    if cfg.eval.online_probe and not probe:
        accelerator.print(f"online probe off: the training data ({cfg.data.name}) has no labels; the collapse "
                          "monitors still log")
    knn_data = data if cfg.eval.data is None else None
    if cfg.eval.knn and cfg.eval.data is not None:
        knn_data = load_dataset(cfg.eval.data, "train")
        accelerator.print(f"eval.data: {describe_line(describe(knn_data, cfg.eval.data), cfg.eval.data)}")
    knn_on = cfg.eval.knn and knn_data.num_classes > 0
    if cfg.eval.knn and not knn_on:
        accelerator.print(f"k-NN monitor off: {no_labels_reason(cfg)}; the collapse monitors still log")
    summary = {f"data_{k}": v for k, v in summary.items()}
    summary.update(knn=knn_on, online_probe=probe, **({"eval_data": eval_data(cfg).name} if knn_on else {}))

    # Method, views, optimiser. The augmentation RNG is seeded alike in every process.
    method = create_method(cfg, data.num_classes if probe else None)
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
    schedules = {**optim_schedules(cfg.optim, cfg.train.batch_size, steps_per_epoch, total_steps),
                 **method.schedules(steps_per_epoch, total_steps)}

    # The run directory is locked and touched only now that bad data or settings would have failed.
    held.enter_context(open_run_dir(accelerator, run_dir, cfg))
    if cfg.train.trackers:
        accelerator.init_trackers(cfg.train.name or "run", config=flat_config(cfg),
                                  init_kwargs={"wandb": {"dir": str(run_dir / "trackers")}})
    model, optimizer = accelerator.prepare(method, optimizer)
    state = TrainState(generator)
    accelerator.register_for_checkpointing(state)
    if cfg.resume:
        ckpt = find_resumable(run_dir / "checkpoints")  # the newest intact one; damaged ones are named
        check_same_model(ckpt, cfg)
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} (step {state.step})")

    log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process,
                     accelerator if cfg.train.trackers else None)
    if cfg.resume and accelerator.is_main_process:
        log.rewind(state.step)  # what was logged after the checkpoint will be logged again
    return Run(
        cfg=cfg, accelerator=accelerator, run_dir=run_dir, method=method, model=model, optimizer=optimizer,
        augment=augment, batches=batches, state=state, schedules=schedules, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, compiled=compiled, log=log,
        guard=NonFiniteGuard(cfg.train.max_nonfinite_steps, cfg.train.precision, run_dir / "checkpoints"),
        knn=knn_monitor(cfg, accelerator, knn_data) if knn_on else None, data_summary=summary,
    )


def epoch_batches(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of the epoch that the current step belongs to, from that step on
    (a resumed run starts mid-epoch where it stopped)."""
    epoch, first = divmod(run.state.step, run.steps_per_epoch)
    run.batches.set_epoch(epoch, start=first * run.cfg.train.grad_accum_steps)
    return iter(run.batches)


def train_step(run: Run, micro_batches: Iterator, values: dict[str, float], window: Window) -> torch.Tensor:
    """One optimiser step over ``grad_accum_steps`` micro-batches with this step's scheduled
    ``values``; accumulates the loss, its terms and the probe's hits into ``window`` on the
    device. Returns the 0-d skip flag (1: non-finite gradients, step skipped)."""
    cfg, method, model = run.cfg, run.method, run.model
    set_schedules(run.optimizer, values)
    method.scheduled = values
    accum = cfg.train.grad_accum_steps
    channels_last = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    shard = (run.accelerator.process_index, run.accelerator.num_processes)
    window.loss = torch.zeros((), device=run.accelerator.device)
    window.terms = {}
    for micro in range(accum):
        batch = next(micro_batches)
        images, labels = batch  # (b, C, H, W) uint8, (b,); batch.sizes: image files' own (h, w), or None
        views = [v.contiguous(memory_format=channels_last)
                 for v in run.augment(images, run.state.generator, shard, batch.sizes)]
        # Gradients are averaged across processes only on the last micro-batch.
        with nullcontext() if micro == accum - 1 else run.accelerator.no_sync(model):
            out = model(views, labels)
            run.accelerator.backward(out["loss"] / accum)
        window.loss += out["ssl_loss"] / accum
        for name, term in out["terms"].items():
            window.terms[name] = window.terms.get(name, 0) + term / accum
        if "online_correct" in out:
            window.online[0] += out["online_correct"]
            window.online[1] += len(labels)  # a scalar operand: no host-to-device copy
    window.features = out["features"]
    return optimizer_step(cfg, run.accelerator, model, method, run.optimizer)


def check_nonfinite(run: Run) -> None:
    """Read the skip flags of the steps since the last check (raises after too many in a row)."""
    run.guard.check(lambda step, total: run.log.write(
        step=step, epoch=(step - 1) // run.steps_per_epoch, event="nonfinite_step", nonfinite_steps=total))


def log_step(run: Run, values: dict[str, float], window: Window, sigterm: bool) -> bool:
    """THE host read of the hot path, every ``log_every_steps``: the loss and its terms, the
    probe, the steps' non-finite flags, and (agreed on by every process) whether SIGTERM came.
    Logs them with this step's schedules and img/s; returns whether to stop."""
    acc, step = run.accelerator, run.state.step
    names = sorted(window.terms)
    local = torch.cat([torch.stack([window.loss, *(window.terms[n] for n in names)]).float(),
                       window.online.float(), torch.tensor([float(sigterm)], device=acc.device)])
    reduced = acc.reduce(local, "sum").tolist()
    check_nonfinite(run)
    world = acc.num_processes
    loss, terms = reduced[0] / world, reduced[1:1 + len(names)]
    correct, seen, terminated = reduced[1 + len(names):]
    window.online.zero_()
    now = time.perf_counter()
    metrics = {
        "loss": loss,
        **{f"loss/{n}": t / world for n, t in zip(names, terms)},
        **values,  # lr, weight_decay and the method's schedules
        "img_per_s": round((step - window.start_step) * run.cfg.train.batch_size / (now - window.start_time), 1),
        **({"online_top1": correct / seen} if seen else {}),
        **({"nonfinite_steps": run.guard.total} if run.guard.total else {}),
    }
    window.start_time, window.start_step = now, step
    run.last.update(metrics)
    run.log.write(step=step, epoch=(step - 1) // run.steps_per_epoch, **metrics)
    run.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "online_top1")})
    return terminated > 0


def evaluate(run: Run, label: str) -> None:
    """k-NN of the method's feature network on the labelled splits."""
    scores = run.knn(run.method.feature_model(), run.accelerator)
    run.last.update(scores)
    run.log.write(step=run.state.step, epoch=run.state.step // run.steps_per_epoch, **scores)
    run.accelerator.print(f"k-NN {label}: top-1 {scores['knn_top1']:.4f}  top-5 {scores['knn_top5']:.4f}")


def checkpoint(run: Run, tag: str) -> None:
    check_nonfinite(run)  # nothing is saved after the first bad step of a run that fails
    save_checkpoint(run.accelerator, run.cfg, run.ckpt_root, tag, run.cfg.train.keep_checkpoints)


def end_epoch(run: Run, epoch: int, started: float, first_step: int, bad_before: int) -> None:
    """An epoch's steps are done: its summary, k-NN when due, a checkpoint."""
    acc, step, cfg = run.accelerator, run.state.step, run.cfg
    if acc.device.type == "cuda":
        torch.cuda.synchronize(acc.device)
    seconds = time.perf_counter() - started
    # undecodable images replaced this epoch (data.bad_images=skip), over all processes
    bad = int(acc.reduce(torch.tensor([run.batches.bad_images - bad_before], device=acc.device), "sum").item())
    run.log.write(step=step, epoch=epoch, event="epoch_end", train_seconds=round(seconds, 3),
                  epoch_img_per_s=round((step - first_step) * cfg.train.batch_size / seconds, 1),
                  **({"bad_images": bad} if bad else {}))
    done = epoch + 1
    if run.knn is not None and (done % cfg.eval.every_epochs == 0 or step >= run.total_steps):
        evaluate(run, f"after epoch {done}")
    if done % cfg.train.checkpoint_every_epochs == 0 or step >= run.total_steps:
        checkpoint(run, f"epoch_{done:04d}")


def teardown(run: Run, finished: bool) -> None:
    """Close the bar; a finished run exports its backbone and logs its end."""
    run.bar.close()
    acc = run.accelerator
    if finished:
        if acc.is_main_process:
            export_backbone(acc.unwrap_model(run.model), run.cfg, run.run_dir / "backbone.safetensors")
            run.log.write(step=run.state.step, epoch=run.state.step // run.steps_per_epoch, event="end")
        acc.print(f"run directory: {run.run_dir} (metrics.jsonl, checkpoints/last, backbone.safetensors)")
        acc.wait_for_everyone()
    acc.end_training()


def train(cfg: Config) -> dict[str, Any]:
    """Run a recipe; returns the last logged metrics (loss, knn_top1, ...)."""
    with exit_with_launcher(), ExitStack() as held:  # held: the run directory's lock, until return
        return loop(setup(cfg, held))


def loop(run: Run) -> dict[str, Any]:
    """The optimiser steps from ``run``'s state to the end (or SIGTERM), then ``teardown``."""
    cfg = run.cfg
    acc, state, spe = run.accelerator, run.state, run.steps_per_epoch
    if run.knn is not None and cfg.eval.at_start and state.step == 0:
        evaluate(run, "untrained network")
    run.log.write(step=state.step, epoch=state.step // spe, event="resume" if cfg.resume else "start",
                  world_size=acc.num_processes, total_steps=run.total_steps, batch_size=cfg.train.batch_size,
                  compiled=run.compiled, **run.data_summary)
    run.bar = tqdm(total=run.total_steps * cfg.train.batch_size, initial=state.step * cfg.train.batch_size,
                   unit="img", unit_scale=True, dynamic_ncols=True,
                   disable=not (cfg.train.progress and acc.is_main_process))
    collapse = CollapseMonitor()
    window = Window(torch.zeros(()), {}, torch.zeros(2, device=acc.device), time.perf_counter(), state.step)
    micro_batches: Optional[Iterator] = None
    stopped = False
    with sigterm_flag() as sigterm:
        while state.step < run.total_steps:
            epoch = state.step // spe
            if micro_batches is None or state.step % spe == 0:  # an epoch (or a resumed one) begins
                micro_batches = epoch_batches(run)
                run.model.train()
                run.bar.set_description(f"epoch {epoch + 1}/{cfg.train.epochs}")
                epoch_start, epoch_first_step, bad_before = time.perf_counter(), state.step, run.batches.bad_images
            values = at_step(run.schedules, state.step)
            skipped = train_step(run, micro_batches, values, window)
            state.step += 1
            run.bar.update(cfg.train.batch_size)
            run.guard.record(state.step, skipped)

            if cfg.eval.collapse_every_steps and state.step % cfg.eval.collapse_every_steps == 0:
                run.log.write(step=state.step, epoch=epoch, **collapse(window.features))  # this process's batch
            stop = sigterm() if acc.num_processes == 1 else False
            if state.step % cfg.train.log_every_steps == 0 or state.step == run.total_steps:
                stop = log_step(run, values, window, sigterm()) or stop  # SIGTERM agreed on by every process
            if stop:
                checkpoint(run, f"epoch_{epoch:04d}_step_{state.step:08d}")
                run.log.write(step=state.step, epoch=epoch, event="sigterm")
                acc.print(f"SIGTERM: saved a checkpoint at step {state.step} and stopped; continue with resume=true")
                stopped = True
                break
            if state.step % spe == 0 or state.step == run.total_steps:
                end_epoch(run, epoch, epoch_start, epoch_first_step, bad_before)
                window.start_time = time.perf_counter()  # evaluation and saving are not training time
            elif cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0:
                checkpoint(run, f"epoch_{epoch:04d}_step_{state.step:08d}")  # mid-epoch
    teardown(run, finished=not stopped)
    return run.last
