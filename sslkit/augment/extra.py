"""Extra kornia augmentations on every view, drawn from the run's generator.

A preset's views can be extended with any per-image kornia augmentation
(``kornia.augmentation.AugmentationBase2D``: ``RandomSharpness``, ``RandomGaussianNoise``,
``RandomAffine``, ``RandomErasing``, ...): in a recipe by class name and keyword arguments,

    augment:
      extra:
        - {name: RandomSharpness, sharpness: 0.5, p: 0.3}

or as modules in Python, ``create_augment(cfg, extra=[kornia.augmentation.RandomSharpness(0.5, p=0.3)])``.
They apply in list order to every view, on the views' device, after sslkit's own ops and before
normalisation (kornia expects images in [0, 1]).

kornia draws its parameters from torch's global RNG. Here each call draws them from a seed read
off the run's augmentation generator, for the global batch (``shard``: each process applies
its rows), inside ``torch.random.fork_rng``, so that the views are the same for the same
seed, after a resume (the generator is in the checkpoint) and for any number of processes, and
the global RNG is left as it was.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from sslkit.errors import UserError
from sslkit.registry import did_you_mean

if TYPE_CHECKING:  # kornia is imported when extras are used: it adds about a second to every import
    from kornia.augmentation import AugmentationBase2D


def extra_from_config(specs: Sequence[Mapping[str, Any]], key: str = "augment.extra") -> list[AugmentationBase2D]:
    """kornia augmentation modules from ``[{name: <kornia.augmentation class>, **kwargs}, ...]``.

    Raises ``UserError`` (one line, naming ``key[i]``) for an entry without a name, a name that
    is not a per-image kornia augmentation (suggesting the nearest), or arguments its class refuses.

    Example:
        >>> [module] = extra_from_config([{"name": "RandomSharpness", "sharpness": 0.5, "p": 0.3}])
        >>> type(module).__name__, module.p
        ('RandomSharpness', 0.3)
    """
    if not specs:
        return []  # without importing kornia
    classes = _augmentation_classes()
    modules = []
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise UserError(f"{where}: expected a mapping with the name of a kornia augmentation, "
                            f"e.g. {{name: RandomSharpness, sharpness: 0.5, p: 0.3}}, got {spec!r}")
        name = spec["name"]
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        if name not in classes:
            raise UserError(f"{where}.name: '{name}' is not a per-image kornia augmentation"
                            f"{did_you_mean(name, sorted(classes))}; see kornia.augmentation")
        try:
            modules.append(classes[name](**kwargs))
        except Exception as err:  # noqa: BLE001 - the recipe's arguments are at fault, whatever kornia raises
            arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            message = (str(err).splitlines() or [""])[0]
            raise UserError(f"{where}: {name}({arguments}) failed: {type(err).__name__}: {message}") from None
    return modules


def _augmentation_classes() -> dict[str, type[AugmentationBase2D]]:
    """kornia.augmentation's per-image augmentations by name (its base classes left out)."""
    import kornia.augmentation as K

    return {name: cls for name, cls in vars(K).items() if isinstance(cls, type)
            and issubclass(cls, K.AugmentationBase2D) and not name.endswith("Base2D")}


class ExtraAugment(nn.Module):
    """kornia augmentations applied in order to a batch of views, reproducibly (see the module docstring).

    ``modules``: instances of ``kornia.augmentation.AugmentationBase2D`` (a mix augmentation such
    as ``RandomMixUpV2`` mixes images across the batch, and a container such as
    ``AugmentationSequential`` hides its parameters: neither is accepted; list the modules instead).
    Every parameter kornia draws is kept in its parameter dict, which is what makes the views
    independent of the number of processes; ``RandomDissolving`` draws more during application
    and is reproducible for the same seed and number of processes only.
    """

    def __init__(self, modules: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        if modules:
            from kornia.augmentation import AugmentationBase2D

            for module in modules:
                if not isinstance(module, AugmentationBase2D):
                    raise TypeError(f"extra augmentations must be per-image kornia augmentations "
                                    f"(kornia.augmentation.AugmentationBase2D), got {module!r}")
        self.augmentations = nn.ModuleList(modules)
        self._per_sample: dict[tuple[int, tuple[int, ...]], frozenset[str]] = {}  # (module, global shape) -> keys

    def __len__(self) -> int:
        return len(self.augmentations)

    def forward(
        self, views: Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)
    ) -> Tensor:
        """views: float (B, C, H, W) in [0, 1], this process's rows of the global batch of world_size x B
        (``shard = (rank, world_size)``) -> the augmented (B, C', H', W') (C', H', W': the modules' output).

        ``generator``: the views' generator (None: torch's default for the views' device). It is
        not advanced: the seed is a hash of its state, read on the host, so that no number goes
        from the device to the host and the views made before and after do not change.
        """
        if not self.augmentations:
            return views
        rank, world_size = shard
        batch, device = views.shape[0], views.device
        rows = slice(rank * batch, (rank + 1) * batch)
        seed = _seed_of(generator if generator is not None else _default_generator(device))
        with _forked_rng(device):
            for index, module in enumerate(self.augmentations):
                shape = (batch * world_size, *views.shape[1:])  # the global batch
                per_sample = self._per_sample_keys(index, module, shape)
                _manual_seed((seed + index) % 2**63, device)  # each module its own stream
                params = module.forward_parameters(shape)
                mine = {k: v[rows] if k in per_sample else v for k, v in params.items()}
                if "forward_input_shape" in mine:  # the input shape kornia records: this process's
                    mine["forward_input_shape"] = mine["forward_input_shape"].new_tensor(views.shape)
                views = module(views, params=mine)
        return views

    def _per_sample_keys(self, index: int, module: nn.Module, shape: tuple[int, ...]) -> frozenset[str]:
        """The keys of ``module``'s parameters that hold one row per sample: those whose first
        dimension follows the batch (kornia also keeps per-call entries, e.g. ColorJitter's
        ``order``, a permutation of 4, which a global batch of 4 could not tell apart)."""
        key = (index, shape)
        if key not in self._per_sample:
            drawn = [module.forward_parameters((n, *shape[1:])) for n in (shape[0], shape[0] + 1)]
            self._per_sample[key] = frozenset(
                k for k, v in drawn[0].items()
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == shape[0]
                and drawn[1][k].shape[0] == shape[0] + 1
            )
        return self._per_sample[key]


def _seed_of(generator: torch.Generator) -> int:
    """A 63-bit seed that is a hash of ``generator``'s state: alike in every process (their
    generators agree), new after any draw, and read on the host (a CUDA generator's state is
    its seed and offset), so no device sync."""
    state = generator.get_state().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 1


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.get_device_module(device.type).current_device()


def _default_generator(device: torch.device) -> torch.Generator:
    """torch's default generator of ``device``."""
    if device.type == "cpu":
        return torch.default_generator
    return torch.get_device_module(device.type).default_generators[_device_index(device)]


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Inside: torch's global RNG of the CPU and of ``device`` free to reseed; after: as before."""
    devices = [] if device.type == "cpu" else [_device_index(device)]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        yield


def _manual_seed(seed: int, device: torch.device) -> None:
    """Seed the global RNG of the CPU and of ``device`` (only that one: ``torch.manual_seed`` would seed every GPU)."""
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        _default_generator(device).manual_seed(seed)
