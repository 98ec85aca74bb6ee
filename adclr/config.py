"""The run's configuration: typed groups, the two size presets, and the plain-dict form checkpoints store.

A config is built in three layers, later ones winning: the dataclass defaults (the paper's values for
everything that does not depend on the scale of the run), a preset (the size-related values), and the
values the user passes. ``train.py``'s flags have the same names as the fields (DINO's names), and the
``--help`` table and the README's table are generated from / checked against ``PRESETS``.

This module imports no torch, so reading a command line or a checkpoint's config stays cheap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The size-related values. ``paper`` is the paper's ViT-S/16 recipe on ImageNet. ``builtin`` is sized
# for 800 iterations on a CPU on the built-in shapes data: its head is narrow (a 32-d bottleneck, 256
# outputs) and its teacher temperature constant at 0.04 (DINO's ViT-S default), because with wider
# heads the teacher's targets start nearly uniform and DINO needs far more iterations than a CPU run
# has to escape that (measured: no k-NN gain after 600 iterations); its learning rate and weight decay
# stay nearly flat, since a cosine to 1e-6 / 0.4 spends half of so short a run barely learning.
PRESETS: dict[str, dict[str, Any]] = {
    "builtin": dict(
        arch="vit_pico",
        patch_size=8,
        out_dim=256,
        head_hidden_dim=512,
        head_bottleneck_dim=32,
        drop_path_rate=0.0,
        global_size=32,
        local_size=16,
        local_crops_number=2,
        num_query=6,
        momentum_teacher=0.996,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        epochs=16,
        batch_size_per_gpu=32,
        lr=0.004,
        min_lr=2.5e-4,
        warmup_epochs=1,
        weight_decay_end=0.04,
    ),
    "paper": dict(
        arch="vit_small",
        patch_size=16,
        out_dim=65536,
        head_hidden_dim=2048,
        head_bottleneck_dim=256,
        drop_path_rate=0.1,
        global_size=224,
        local_size=96,
        local_crops_number=10,
        num_query=10,
        momentum_teacher=0.996,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
        epochs=100,
        batch_size_per_gpu=64,
        lr=0.0005,
        min_lr=1e-6,
        warmup_epochs=10,
        weight_decay_end=0.4,
    ),
}


def default_preset(data_path: str | None) -> str:
    """``paper`` when training on real images, ``builtin`` on the built-in shapes."""
    return "paper" if data_path else "builtin"


# Fields without a default are set by every preset (see ``PRESETS``); ``kw_only`` lets them come first.
@dataclass(kw_only=True)
class ModelConfig:
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
class DataConfig:
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
class LossConfig:
    """The EMA teacher and the ADCLR loss."""

    momentum_teacher: float
    teacher_temp: float
    warmup_teacher_temp_epochs: int
    warmup_teacher_temp: float = 0.04
    lambda_query: float = 0.5
    fused_loss: bool = True  # the heads' last layer applied inside the chunked loss (adclr.fused_loss)


@dataclass(kw_only=True)
class OptimConfig:
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
class RunConfig:
    """Output, seeding, evaluation and logging."""

    output_dir: str = "runs/adclr"
    saveckp_freq: int = 20
    seed: int = 0
    eval_every: int = 0
    eval_data_path: str | None = None  # a folder with train/ and val/ ImageFolder trees; None: the built-in shapes
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

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    @property
    def global_size(self) -> int:
        return self.data.global_size

    @property
    def query_keys(self) -> str:
        return self.model.query_keys

    @property
    def bidirectional(self) -> bool:
        return self.model.bidirectional

    @property
    def num_query(self) -> int:
        return self.data.num_query

    @property
    def seed(self) -> int:
        return self.run.seed

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
