"""The run's configuration: typed groups, the two size presets, and the plain-dict form checkpoints store.

A config is built in three layers, later ones winning: the dataclass defaults (the paper's values for
everything that does not depend on the scale of the run), a preset (the size-related values), and the
values the user passes. ``train.py``'s flags have the same names as the fields (DINO's names), and the
``--help`` table and the README's table are generated from / checked against ``PRESETS``.

Every field's accepted values are here too (``BOUNDS``, ``CHOICES``, ``TrainConfig.__post_init__``):
the config refuses a bad value with a ``ConfigError`` naming the field, and ``train.py``'s flags parse
with the same bounds, so the command line and the Python API accept exactly the same runs.

This module imports no torch, so reading a command line or a checkpoint's config stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .choices import ARCHS, ATTN_BACKENDS, LOSS_BACKENDS, PRECISIONS, QUERY_KEY_RULES
from .errors import ConfigError

# The size-related values. ``paper`` is the paper's ViT-S/16 recipe on ImageNet. ``builtin`` is sized for
# 600 iterations on a CPU on the built-in 48 px scenes: a narrow head (a 32-d bottleneck, 256 outputs), a
# constant teacher temperature of 0.02 (at 0.04 the teacher's outputs flatten after a few hundred iterations
# and the CLS loss climbs back to ln K, with DINO's own code as with ours; bench/results/
# 2026-12-05_cpu_collapse), and a learning rate that decays to a tenth of its peak (chosen on the holdout
# scenes, never on the val split).
_PRESET_NAMES = ("builtin", "paper")
_PRESET_VALUES: dict[str, tuple[Any, Any]] = {  # field: (builtin, paper)
    "arch": ("vit_pico", "vit_small"),
    "patch_size": (8, 16),
    "out_dim": (256, 65536),
    "head_hidden_dim": (512, 2048),
    "head_bottleneck_dim": (32, 256),
    "drop_path_rate": (0.0, 0.1),
    "global_size": (48, 224),
    "local_size": (16, 96),
    "local_crops_number": (2, 10),
    "num_query": (6, 10),
    "momentum_teacher": (0.996, 0.996),
    "teacher_temp": (0.02, 0.07),
    "warmup_teacher_temp_epochs": (0, 30),
    "epochs": (12, 100),
    "batch_size_per_gpu": (32, 64),
    "lr": (0.002, 0.0005),
    "min_lr": (2.5e-5, 1e-6),
    "warmup_epochs": (1, 10),
    "weight_decay_end": (0.04, 0.4),
}
PRESETS: dict[str, dict[str, Any]] = {
    name: {field: values[i] for field, values in _PRESET_VALUES.items()} for i, name in enumerate(_PRESET_NAMES)
}


@dataclass(frozen=True)
class Bounds:
    """The values a numeric field accepts: integers or finite numbers from ``low`` to ``high`` (None: no
    bound), each end included unless ``low_open`` / ``high_open``."""

    integer: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        return f"{'an integer' if self.integer else 'a number'} {self.condition}".rstrip()

    @property
    def condition(self) -> str:
        """The range alone: ``>= 1``, ``in (0, 1]``."""
        low, high = (f"{value:g}" if isinstance(value, float) else value for value in (self.low, self.high))
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{low}, {high}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        return ""

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def parse(self, text: str) -> int | float:
        """``argparse`` type: the number ``text`` if it is in bounds; else argparse names the flag and this range."""
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            value = None
        if value is None or not self.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {self}, got {text!r}")
        return value


_COUNT = Bounds(integer=True, low=0)
_POSITIVE_INT = Bounds(integer=True, low=1)
_NON_NEGATIVE = Bounds(integer=False, low=0)
_POSITIVE = Bounds(integer=False, low=0, low_open=True)
# A teacher temperature sharpens (DINO: 0.04 to 0.07, below the student's 0.1); above 1 it only flattens.
_TEMPERATURE = Bounds(integer=False, low=0, high=1, low_open=True)
_AREA = Bounds(integer=False, low=0, high=1, low_open=True)  # either end of a crop's (min, max) area range
BOUNDS: dict[str, Bounds] = {
    "patch_size": _POSITIVE_INT,
    "out_dim": Bounds(integer=True, low=2),  # a softmax over one output is 1: the loss would be exactly 0
    "head_hidden_dim": _POSITIVE_INT,
    "head_bottleneck_dim": _POSITIVE_INT,
    "drop_path_rate": Bounds(integer=False, low=0, high=1, high_open=True),
    "global_size": _POSITIVE_INT,
    "local_size": _POSITIVE_INT,
    "local_crops_number": _COUNT,
    "num_query": _COUNT,
    "global_crops_scale": _AREA,
    "local_crops_scale": _AREA,
    "query_scale": _AREA,
    # The built-in evaluation's dense probe trains on a quarter of the train split and scores half the test one.
    "builtin_train_size": Bounds(integer=True, low=4),
    "builtin_test_size": Bounds(integer=True, low=2),
    "num_workers": _COUNT,
    "momentum_teacher": Bounds(integer=False, low=0, high=1, high_open=True),  # 1: the teacher never moves
    "teacher_temp": _TEMPERATURE,
    "warmup_teacher_temp": _TEMPERATURE,
    "warmup_teacher_temp_epochs": _COUNT,
    "lambda_query": _NON_NEGATIVE,
    "epochs": _POSITIVE_INT,
    "batch_size_per_gpu": _POSITIVE_INT,
    "lr": _NON_NEGATIVE,
    "min_lr": _NON_NEGATIVE,
    "warmup_epochs": _COUNT,
    "weight_decay": _NON_NEGATIVE,
    "weight_decay_end": _NON_NEGATIVE,
    "clip_grad": _NON_NEGATIVE,
    "freeze_last_layer": _COUNT,
    "saveckp_freq": _COUNT,
    "seed": Bounds(integer=True, low=0, high=2**32 - 1),
    "eval_every": _COUNT,
}
PAIRS = ("global_crops_scale", "local_crops_scale", "query_scale")  # (min, max) with min <= max
CHOICES: dict[str, tuple] = {
    "arch": tuple(ARCHS),
    "attn_backend": ATTN_BACKENDS,
    "loss_backend": LOSS_BACKENDS,
    "query_keys": QUERY_KEY_RULES,
    "precision": PRECISIONS,  # or None: chosen by device
    "builtin_eval_split": ("test", "holdout"),
}


def check_field(name: str, value: Any) -> None:
    """Raise ``ConfigError`` unless ``value`` is one that field ``name`` accepts."""
    if name in PAIRS:
        if not (isinstance(value, tuple) and len(value) == 2):
            raise ConfigError(name, f"must be a (min, max) pair, got {value!r}")
        for end in value:
            if not BOUNDS[name].accepts(end):
                raise ConfigError(name, f"must be two numbers {BOUNDS[name].condition} (min, max), got {value!r}")
        if value[0] > value[1]:
            raise ConfigError(name, f"must be (min, max) with min <= max, got {value!r}")
    elif name in BOUNDS:
        if not BOUNDS[name].accepts(value):
            raise ConfigError(name, f"must be {BOUNDS[name]}, got {value!r}")
    elif name in CHOICES:
        if value not in CHOICES[name] and not (name == "precision" and value is None):
            raise ConfigError(name, f"must be one of {CHOICES[name]}, got {value!r}")


class _Checked:
    """Group dataclasses check every field when built (``check_field``)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f.name, f"must be True or False, got {value!r}")
            check_field(f.name, value)


def default_preset(data_path: str | None) -> str:
    """``paper`` when training on real images, ``builtin`` on the built-in scenes."""
    return "paper" if data_path else "builtin"


# Fields without a default are set by every preset (see ``PRESETS``); ``kw_only`` lets them come first.
@dataclass(kw_only=True)
class ModelConfig(_Checked):
    """The ViT and its DINO head(s)."""

    arch: str
    patch_size: int
    out_dim: int
    head_hidden_dim: int
    head_bottleneck_dim: int
    drop_path_rate: float
    norm_last_layer: bool = True
    separate_query_head: bool = False
    attn_backend: str = "auto"
    query_keys: str = "prefix+raw"
    bidirectional: bool = False


@dataclass(kw_only=True)
class DataConfig(_Checked):
    """Where images come from and how each becomes multi-crop views plus query crops."""

    global_size: int
    local_size: int
    local_crops_number: int
    num_query: int
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    query_scale: tuple[float, float] = (0.05, 0.15)
    data_path: str | None = None
    builtin_train_size: int = 1600
    builtin_test_size: int = 600
    num_workers: int = 2


@dataclass(kw_only=True)
class LossConfig(_Checked):
    """The EMA teacher and the ADCLR loss."""

    momentum_teacher: float
    teacher_temp: float
    warmup_teacher_temp_epochs: int
    warmup_teacher_temp: float = 0.04
    lambda_query: float = 0.5
    fused_loss: bool = True  # the heads' last layer applied inside the chunked loss (adclr.fused_loss)
    loss_backend: str = "auto"  # the fused loss's row operations: triton, torch, or auto (by device)


@dataclass(kw_only=True)
class OptimConfig(_Checked):
    """AdamW, its schedules and the numeric precision."""

    epochs: int
    batch_size_per_gpu: int
    lr: float  # peak, at a total batch of 256 (scaled linearly with the real total batch)
    min_lr: float
    warmup_epochs: int
    weight_decay_end: float
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    precision: str | None = None  # None: bf16 on CUDA, fp32 on CPU (chosen when the device is known)


@dataclass(kw_only=True)
class RunConfig(_Checked):
    """Output, seeding, evaluation and logging."""

    output_dir: str = "runs/adclr"
    saveckp_freq: int = 20
    seed: int = 0
    eval_every: int = 0
    eval_data_path: str | None = None  # a folder with train/ and val/ ImageFolder trees; None: the built-in scenes
    builtin_eval_split: str = "test"  # built-in val split; "holdout": unseen train scenes, to choose settings
    tensorboard: bool = False


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
# field name -> group name; field names are unique across groups (they are the command-line flags).
FIELD_GROUP: dict[str, str] = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def _shortcut(group: str, name: str) -> property:
    """A read-only top-level view of field ``name`` of ``group``."""
    return property(lambda config: getattr(getattr(config, group), name), doc=f"``{group}.{name}``")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run depends on, in groups; ``preset`` records which preset filled the size fields.

    ``arch``, ``patch_size``, ``global_size``, ``query_keys``, ``bidirectional``, ``num_query`` and
    ``seed`` are also readable at the top level: they are what users of a trained backbone need.
    """

    preset: str
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    optim: OptimConfig
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        """Checks across groups (each group checks its own fields)."""
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"must be one of {tuple(PRESETS)}, got {self.preset!r}")
        patch = self.model.patch_size
        sizes = {"global_size": self.data.global_size}
        if self.data.local_crops_number:
            sizes["local_size"] = self.data.local_size
        for name, size in sizes.items():
            if size % patch:  # timm's patch embedding takes whole patches only
                raise ConfigError(name, f"must be a multiple of the patch size ({patch}), got {size}")
        if self.data.local_crops_number and self.data.local_size > self.data.global_size:
            global_size = self.data.global_size
            raise ConfigError(
                "local_size",
                f"must be at most the global crops' size (--global_size {global_size}), got {self.data.local_size}",
            )
        if self.optim.min_lr > self.optim.lr:  # the cosine would rise from the peak to its "minimum"
            raise ConfigError(
                "min_lr", f"must be at most the peak learning rate (--lr {self.optim.lr}), got {self.optim.min_lr}"
            )

    arch = _shortcut("model", "arch")
    patch_size = _shortcut("model", "patch_size")
    global_size = _shortcut("data", "global_size")
    query_keys = _shortcut("model", "query_keys")
    bidirectional = _shortcut("model", "bidirectional")
    num_query = _shortcut("data", "num_query")
    seed = _shortcut("run", "seed")

    @property
    def uses_query_loss(self) -> bool:
        """Whether the query loss takes part (Q > 0 and lambda != 0): else no query token is computed,
        and no separate query head is built (a head without gradient would stop DDP)."""
        return self.data.num_query > 0 and self.loss.lambda_query != 0

    def flat(self) -> dict[str, Any]:
        """Field name -> value over every group (the names of ``train.py``'s flags)."""
        return {name: getattr(getattr(self, group), name) for name, group in FIELD_GROUP.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain containers only (str, numbers, bool, None, tuples, dicts): what a checkpoint stores."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of ``to_dict``; a field missing from ``data`` takes its default, an unknown one is refused."""
        if not isinstance(data, dict):
            raise TypeError(f"a config must be a dict, got {type(data).__name__}")
        unknown = set(data) - {"preset", *GROUPS}
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {['preset', *GROUPS]}")
        if data.get("preset") not in PRESETS:
            raise ValueError(f"config preset must be one of {tuple(PRESETS)}, got {data.get('preset')!r}")
        groups = {}
        for group, group_cls in GROUPS.items():
            values = data.get(group, {})
            known = {f.name for f in dataclasses.fields(group_cls)}
            if set(values) - known:
                raise ValueError(f"unknown field(s) {sorted(set(values) - known)} in config section {group!r}")
            missing = {f.name for f in dataclasses.fields(group_cls) if _required(f)} - set(values)
            if missing:
                raise ValueError(f"config section {group!r} lacks {sorted(missing)}")
            groups[group] = group_cls(**{name: _plain(value) for name, value in values.items()})
        return cls(preset=data["preset"], **groups)


def make_config(preset: str | None = None, **values: Any) -> TrainConfig:
    """The config of a run: defaults, then ``preset``'s values, then ``values`` (field name -> value).

    ``preset=None`` picks ``default_preset(values.get("data_path"))``. Unknown field names are refused.
    """
    unknown = set(values) - set(FIELD_GROUP)
    if unknown:
        raise TypeError(f"unknown config field(s) {sorted(unknown)}")
    preset = default_preset(values.get("data_path")) if preset is None else preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for name, value in {**PRESETS[preset], **values}.items():
        grouped[FIELD_GROUP[name]][name] = _plain(value)
    return TrainConfig(preset=preset, **{group: cls(**grouped[group]) for group, cls in GROUPS.items()})


def field_default(name: str) -> Any:
    """The dataclass default of field ``name`` (``dataclasses.MISSING`` for a preset-set field)."""
    f = next(f for f in dataclasses.fields(GROUPS[FIELD_GROUP[name]]) if f.name == name)
    return f.default


def preset_table() -> str:
    """A plain-text table of every preset's values, one row per field (for ``train.py --help``)."""
    names = list(PRESETS)
    rows = [["flag", *names]] + [[f"--{f}", *(str(PRESETS[p][f]) for p in names)] for f in PRESETS[names[0]]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _plain(value: Any) -> Any:
    """Lists (argparse's ``nargs``, JSON) become tuples: the config's sequence fields are tuples."""
    return tuple(value) if isinstance(value, list) else value
