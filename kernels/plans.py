"""Which kernel variant and which tiles run a given attention call: built-in tables, per-GPU tuned
tables (``kernels/tiles/<gpu>.json``, written by ``python -m bench.tune``) and a forced override.

A call is keyed by ``ShapeKey``: the padded head dim, a sequence-length bucket, the dtype and the mask
kind (``full`` when every row sees every key, else the query-key rule). A ``Plan`` names the forward
variant (``v2``) and the backward variant (``short``: one program per head, L <= 128; ``fused``: one
launch for any L), each with its tiles. Resolution order: ``forced_plan`` (the tuner and tests) > the
tuned table of this GPU > the built-in defaults below. A missing, unreadable or invalid table entry
falls back to the defaults with one warning; the table is read once per process (``clear_table_cache`` forgets it).

``auto_backend`` is ``backend="auto"``'s choice on an sm80+ GPU: the table's measured backend for the
key, else ``default_backend``: our kernel only where the built-in tiles were sized (ADCLR masks,
padded head dim <= 64, fp16/bf16), exact SDPA everywhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import warnings

import torch

SEQ_BUCKETS = (64, 128, 256, 512, 1024)  # L <= bound; longer sequences share the bucket "long"
BUCKET_NAMES = tuple(str(b) for b in SEQ_BUCKETS) + ("long",)
MASK_KINDS = ("full", "prefix+raw", "raw", "prefix+raw+self", "raw+self")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
BLOCK_DS = (16, 32, 64, 128, 256)
FWD_VARIANTS = ("v2",)
BWD_VARIANTS = ("short", "fused")
SHORT_MAX_LEN = 64  # the single-pass backward holds the whole sequence in one tile of at most 64 rows...
SHORT_MAX_TILE = 64 * 128  # ...and this many elements (L x D padded): 128-row tiles spill on sm90
TILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiles")
TABLE_SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Launch shape of one kernel. ``block_m``/``block_n`` are the forward's row and key blocks, the
    fused backward's owned and stepped blocks, and unused (0) by ``short`` (its tile is the sequence)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(obj) -> Tiles:
        if not isinstance(obj, dict) or set(obj) != {"block_m", "block_n", "num_warps", "num_stages"}:
            raise ValueError(f"tiles must be an object with block_m, block_n, num_warps, num_stages; got {obj!r}")
        values = {k: obj[k] for k in obj}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
            raise ValueError(f"tiles must hold integers, got {obj!r}")
        tiles = Tiles(**values)
        tiles.check()
        return tiles

    def check(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value != 0 and (value < 16 or value > 256 or value & (value - 1)):
                raise ValueError(f"{name} must be 0 or a power of two in [16, 256], got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be in [1, 8], got {self.num_stages}")

    def __str__(self) -> str:
        blocks = f"{self.block_m}x{self.block_n} " if self.block_m else ""
        return f"{blocks}w{self.num_warps} s{self.num_stages}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Forward and backward variants with their tiles (``None``: the variant's own table, or the
    autotuner under ``ADCLR_AUTOTUNE=1``)."""

    fwd: str
    fwd_tiles: Tiles | None
    bwd: str
    bwd_tiles: Tiles | None


@dataclasses.dataclass(frozen=True)
class ShapeKey:
    block_d: int
    seq_bucket: str
    dtype: str
    mask: str


def seq_bucket(seq_len: int) -> str:
    """The bucket of a sequence length: the smallest of ``SEQ_BUCKETS`` >= L, else ``long``."""
    for bound in SEQ_BUCKETS:
        if seq_len <= bound:
            return str(bound)
    return "long"


def mask_kind(seq_len: int, shared_keys: int, query_key_start: int, query_self: bool) -> str:
    """The mask kind of ``kernel_params``: ``full`` when every row sees all L keys, else the rule."""
    if shared_keys == seq_len:
        return "full"
    return ("prefix+raw" if query_key_start == 0 else "raw") + ("+self" if query_self else "")


def block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def shape_key(seq_len: int, head_dim: int, dtype: torch.dtype, kernel_params) -> ShapeKey:
    return ShapeKey(block_d(head_dim), seq_bucket(seq_len), DTYPE_NAMES[dtype], mask_kind(seq_len, *kernel_params))


def tiles_sized_for(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the built-in tiles and the tuning candidates were sized for this head dim and dtype:
    padded D <= 64 in fp16/bf16 (spill-free on sm90 and sm80, bench/compile_check.py). Larger head dims
    and fp32 have one conservative tile each, never tuned against alternatives."""
    return block_d(head_dim) <= 64 and dtype in (torch.float16, torch.bfloat16)


def short_eligible(seq_len: int, head_dim: int) -> bool:
    """Whether the short backward can run: L <= 64 and the padded L x D tile <= 64 x 128 (a 128-row
    tile spills on sm90 even at 8 warps: 255 registers and 56 bytes of stack at D = 64)."""
    return seq_len <= SHORT_MAX_LEN and short_block(seq_len) * block_d(head_dim) <= SHORT_MAX_TILE


def short_block(seq_len: int) -> int:
    """The single tile of the short backward: L padded to a power of two, at least 16."""
    return max(16, 1 << (seq_len - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# Built-in tables (GPU). Sized from offline compiles (bench/compile_check.py, sm90/sm80/sm70; registers
# and spills recorded in bench/NOTES.md): 4 warps wherever that does not spill. At D <= 64 in half
# precision the 64 x 64 forward and the 64 x 32 fused backward take a third pipeline stage: the
# forward gets it at no register cost (triton 3.6 and 3.8); the fused backward's dO/O loads are
# single-buffered at two stages, and at three it keeps its registers and CTAs per SM on sm90 and sm80
# (triton 3.8: 165 / 223 registers with / without +self on sm90, 44 KB of shared memory).
# --------------------------------------------------------------------------------------------------

T = Tiles
# v2 forward: by head dim, then by sequence bucket ("*" for every bucket not listed).
V2_FWD_TILES = {
    torch.float16: {
        64: {"*": T(64, 64, 4, 3), "512": T(128, 64, 8, 3), "1024": T(128, 64, 8, 3), "long": T(128, 64, 8, 3)},
        128: {"*": T(64, 64, 4, 2), "1024": T(128, 64, 8, 2), "long": T(128, 64, 8, 2)},
        256: {"*": T(64, 32, 8, 2)},
    },
    torch.float32: {64: {"*": T(32, 32, 4, 2)}, 128: {"*": T(16, 32, 4, 2)}},
}
# Fused backward: (owned block, stepped block).
V2_FUSED_TILES = {
    torch.float16: {64: {"*": T(64, 32, 4, 3)}, 128: {"*": T(64, 32, 8, 2)}, 256: {"*": T(16, 16, 4, 1)}},
    torch.float32: {64: {"*": T(16, 32, 4, 2)}, 128: {"*": T(16, 32, 8, 1)}},
}
INTERPRETER_TILES = T(32, 32, 1, 1)  # the CPU interpreter: small blocks exercise boundary and interior paths
# What the tuner (bench/tune.py) and ADCLR_AUTOTUNE=1 try at head dims <= 64, all free of spills on sm90
# (bench/compile_check.py). On sm80 the fused 64 x 32 tiles build without spills with triton 3.8 (236-237
# registers, 255 with +self); triton 3.6 spilled 8 bytes without +self (bench/NOTES.md). Larger head dims
# try the table's tile only.
FWD_CANDIDATES = (
    T(64, 64, 4, 2),
    T(64, 64, 4, 3),
    T(64, 32, 4, 3),
    T(32, 64, 4, 2),
    T(128, 64, 8, 3),
    T(128, 32, 4, 3),
)
FUSED_CANDIDATES = (T(64, 32, 4, 2), T(64, 64, 4, 2), T(64, 32, 4, 3), T(128, 32, 8, 2), T(32, 32, 4, 3))
SHORT_CANDIDATES = (T(0, 0, 4, 1), T(0, 0, 8, 1))


def _half_or_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float32 else torch.float16


def _by_head_dim(table: dict, head_dim: int, what: str):
    for bound in sorted(table):
        if head_dim <= bound:
            return table[bound]
    raise ValueError(f"head dim {head_dim} exceeds the largest the {what} tile table covers")


def fwd_tiles(seq_len: int, head_dim: int, dtype: torch.dtype) -> Tiles:
    """The built-in tiles of the v2 forward."""
    by_bucket = _by_head_dim(V2_FWD_TILES[_half_or_fp32(dtype)], head_dim, str(dtype))
    return by_bucket.get(seq_bucket(seq_len), by_bucket["*"])


def fused_tiles(seq_len: int, head_dim: int, dtype: torch.dtype) -> Tiles:
    """The built-in tiles (owned block, stepped block) of the fused backward."""
    by_bucket = _by_head_dim(V2_FUSED_TILES[_half_or_fp32(dtype)], head_dim, str(dtype))
    return by_bucket.get(seq_bucket(seq_len), by_bucket["*"])


def short_tiles(seq_len: int, head_dim: int) -> Tiles:
    """4 warps for tiles up to 64 x 64 elements, 8 above (4 would spill); one stage (no loop)."""
    return Tiles(0, 0, 4 if short_block(seq_len) * block_d(head_dim) <= 64 * 64 else 8, 1)


def default_plan(seq_len: int, head_dim: int, dtype: torch.dtype, interpreting: bool = False) -> Plan:
    """The plan without a tuned table: v2 forward; in half precision the short backward where one
    tile holds the sequence (fp32's exact products spill there), fused otherwise. Under the
    interpreter the same variants with small tiles."""
    short = short_eligible(seq_len, head_dim) and dtype != torch.float32
    if interpreting:
        return Plan("v2", INTERPRETER_TILES, "short" if short else "fused", INTERPRETER_TILES)
    fwd = fwd_tiles(seq_len, head_dim, dtype)
    if short:
        return Plan("v2", fwd, "short", short_tiles(seq_len, head_dim))
    return Plan("v2", fwd, "fused", fused_tiles(seq_len, head_dim, dtype))


# --------------------------------------------------------------------------------------------------
# Tuned tables
# --------------------------------------------------------------------------------------------------


UNTUNED_BACKWARD_MAX_LEN = 512  # untuned forward + backward beyond this length stays on SDPA


def default_backend(seq_len: int, head_dim: int, dtype: torch.dtype, kernel_params, mode: str) -> str:
    """``auto``'s backend for a key the tuned table has not measured. Ours for the ADCLR masks at
    padded head dim <= 64 in fp16/bf16 (what the built-in tiles were sized for); SDPA for the ``full``
    mask (no query tokens: SDPA is then one FlashAttention call computing the same function), for
    larger head dims and for fp32, where nothing has shown ours to be faster, and for forward +
    backward (``mode`` ``fwd+bwd``) at L > 512: there the backward is compute-bound and ours does 1.4x
    the products of FlashAttention-2's (bench/NOTES.md), so only a measurement may send it to ours."""
    if mask_kind(seq_len, *kernel_params) == "full" or not tiles_sized_for(head_dim, dtype):
        return "sdpa"
    if mode == "fwd+bwd" and seq_len > UNTUNED_BACKWARD_MAX_LEN:
        return "sdpa"
    return "triton"


def device_slug(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``: the table's file name."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def tiles_dir() -> str:
    """Where per-GPU tables live: ``$ADCLR_TILES_DIR`` if set, else ``kernels/tiles/``."""
    return os.environ.get("ADCLR_TILES_DIR") or TILES_DIR


def table_path(device_name: str, directory: str | None = None) -> str:
    """The table of ``device_name`` under ``directory`` (default ``tiles_dir()``)."""
    return os.path.join(directory or tiles_dir(), device_slug(device_name) + ".json")


@dataclasses.dataclass(frozen=True)
class TunedEntry:
    """One measured key: the fastest of our variants and, per mode, the fastest exact backend."""

    fwd: str
    fwd_tiles: Tiles | None
    bwd: str
    bwd_tiles: Tiles | None
    auto: dict  # {"fwd": "triton" | "sdpa", "fwd+bwd": "triton" | "sdpa"}


def _variant(obj, variants: tuple, what: str) -> tuple[str, Tiles | None]:
    if not isinstance(obj, dict) or obj.get("variant") not in variants:
        raise ValueError(f"{what} must be an object with variant in {variants}, got {obj!r}")
    return obj["variant"], Tiles.from_json(obj.get("tiles"))


def parse_entry(obj) -> tuple[ShapeKey, TunedEntry]:
    """Validate one table entry; raises ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"entry must be an object, got {obj!r}")
    key = ShapeKey(obj.get("block_d"), obj.get("seq_bucket"), obj.get("dtype"), obj.get("mask"))
    if key.block_d not in BLOCK_DS:
        raise ValueError(f"block_d must be one of {BLOCK_DS}, got {key.block_d!r}")
    if key.seq_bucket not in BUCKET_NAMES:
        raise ValueError(f"seq_bucket must be one of {BUCKET_NAMES}, got {key.seq_bucket!r}")
    if key.dtype not in DTYPE_NAMES.values():
        raise ValueError(f"dtype must be one of {tuple(DTYPE_NAMES.values())}, got {key.dtype!r}")
    if key.mask not in MASK_KINDS:
        raise ValueError(f"mask must be one of {MASK_KINDS}, got {key.mask!r}")
    fwd, fwd_tiles = _variant(obj.get("fwd"), FWD_VARIANTS, "fwd")
    bwd, bwd_tiles = _variant(obj.get("bwd"), BWD_VARIANTS, "bwd")
    if bwd == "short" and not short_eligible(int(key.seq_bucket) if key.seq_bucket != "long" else 2**31, key.block_d):
        raise ValueError(f"bwd variant short needs L <= {SHORT_MAX_LEN} and a padded L x D tile <= {SHORT_MAX_TILE}")
    auto = obj.get("auto")
    if not isinstance(auto, dict) or set(auto) != {"fwd", "fwd+bwd"} or not set(auto.values()) <= {"triton", "sdpa"}:
        raise ValueError(f'auto must be {{"fwd": "triton"|"sdpa", "fwd+bwd": "triton"|"sdpa"}}, got {auto!r}')
    return key, TunedEntry(fwd, fwd_tiles, bwd, bwd_tiles, dict(auto))


@functools.cache
def load_table(path: str) -> dict[ShapeKey, TunedEntry]:
    """The valid entries of the table at ``path`` (empty if there is none); read once per path.
    Invalid entries are skipped with one warning naming them; an unreadable file is ignored."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        if (
            not isinstance(data, dict)
            or data.get("schema") != TABLE_SCHEMA
            or not isinstance(data.get("entries"), list)
        ):
            raise ValueError(f'expected {{"schema": {TABLE_SCHEMA}, "entries": [...]}}')
    except (OSError, ValueError) as error:
        warnings.warn(f"ignoring tuned tile table {path}: {error}; using the built-in tiles", stacklevel=2)
        return {}
    entries, bad = {}, []
    for i, obj in enumerate(data["entries"]):
        try:
            key, entry = parse_entry(obj)
        except (ValueError, TypeError) as error:
            bad.append(f"entry {i}: {error}")
            continue
        entries[key] = entry
    if bad:
        warnings.warn(f"tuned tile table {path}: skipped {len(bad)} invalid entries ({'; '.join(bad)})", stacklevel=2)
    return entries


@functools.cache
def _device_table(device_name: str, directory: str) -> dict[ShapeKey, TunedEntry]:
    """The table of ``device_name`` under ``directory``: the file name is worked out once per pair,
    not on each of the three lookups (dispatch, forward, backward) of every attention call."""
    return load_table(table_path(device_name, directory))


_table_generation = [0]  # bumped by clear_table_cache: plans decided from older tables are stale


def clear_table_cache() -> None:
    """Forget every table read so far, so the next call reads the files again (tests, the tuner)."""
    _device_table.cache_clear()
    load_table.cache_clear()
    _table_generation[0] += 1


def resolution_state() -> tuple:
    """Everything besides the call's shape key that ``resolve_plan`` reads: the innermost forced plan,
    ``ADCLR_AUTOTUNE``, the tables' folder and which tables were read. Callers that cache plans per
    shape key add this to the key, so a change to any of them is seen on the next call."""
    return (_forced[-1] if _forced else None, autotune_enabled(), tiles_dir(), _table_generation[0])


def tuned_entry(device_name: str, key: ShapeKey) -> TunedEntry | None:
    return _device_table(device_name, tiles_dir()).get(key)


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------

_forced: list[Plan] = []


@contextlib.contextmanager
def forced_plan(plan: Plan):
    """Run every kernel call inside the block with ``plan`` (the tuner and the tests)."""
    check_plan(plan)
    _forced.append(plan)
    try:
        yield plan
    finally:
        _forced.pop()


def check_plan(plan: Plan) -> None:
    if plan.fwd not in FWD_VARIANTS:
        raise ValueError(f"forward variant must be one of {FWD_VARIANTS}, got {plan.fwd!r}")
    if plan.bwd not in BWD_VARIANTS:
        raise ValueError(f"backward variant must be one of {BWD_VARIANTS}, got {plan.bwd!r}")
    for tiles in (plan.fwd_tiles, plan.bwd_tiles):
        if tiles is not None:
            tiles.check()


def autotune_enabled() -> bool:
    """Whether ``ADCLR_AUTOTUNE=1`` is set (see ``autotunes``)."""
    return os.environ.get("ADCLR_AUTOTUNE", "0") == "1"


def autotunes(head_dim: int, dtype: torch.dtype) -> bool:
    """``ADCLR_AUTOTUNE=1`` lets Triton's autotuner pick the tiles (v2 forward, fused backward) per
    (head dim, rule, dtype and, for v2, sequence bucket) instead of the tables, but only where its
    candidates are free of spills: padded head dim <= 64 in fp16/bf16. Other calls keep the table tiles."""
    return autotune_enabled() and tiles_sized_for(head_dim, dtype)


def resolve_plan(seq_len: int, head_dim: int, dtype: torch.dtype, kernel_params, device_name: str | None) -> Plan:
    """The plan of one call. ``device_name`` None means the CPU interpreter."""
    if _forced:
        plan = _forced[-1]
        if plan.bwd == "short" and not short_eligible(seq_len, head_dim):
            raise ValueError(
                f"the short backward needs L <= {SHORT_MAX_LEN} and a padded L x D tile <= {SHORT_MAX_TILE}, "
                f"got L={seq_len}, head dim {head_dim}"
            )
        return plan
    default = default_plan(seq_len, head_dim, dtype, interpreting=device_name is None)
    if device_name is None:
        return default
    # A valid entry's short backward fits every call of its key (parse_entry checks the bucket's largest L).
    entry = tuned_entry(device_name, shape_key(seq_len, head_dim, dtype, kernel_params))
    plan = default if entry is None else Plan(entry.fwd, entry.fwd_tiles, entry.bwd, entry.bwd_tiles)
    if autotunes(head_dim, dtype):  # the autotuner picks the tiles of the v2 forward and the fused backward
        plan = dataclasses.replace(
            plan,
            fwd_tiles=None if plan.fwd == "v2" else plan.fwd_tiles,
            bwd_tiles=None if plan.bwd == "fused" else plan.bwd_tiles,
        )
    return plan


def tuned_backend(device_name: str, seq_len: int, head_dim: int, dtype: torch.dtype, kernel_params, mode: str):
    """``"triton"`` or ``"sdpa"`` where this GPU's table measured the key, else None."""
    entry = tuned_entry(device_name, shape_key(seq_len, head_dim, dtype, kernel_params))
    return None if entry is None else entry.auto[mode]


def auto_backend(device_name: str, seq_len: int, head_dim: int, dtype: torch.dtype, kernel_params, mode: str) -> str:
    """``backend="auto"`` on an sm80+ GPU: the tuned table's backend for the key and ``mode`` (``fwd``
    or ``fwd+bwd``), else ``default_backend``. Decided once per call key, tables folder and table
    generation (``clear_table_cache`` bumps it)."""
    return _auto_backend(device_name, seq_len, head_dim, dtype, kernel_params, mode, tiles_dir(), _table_generation[0])


@functools.lru_cache(maxsize=4096)
def _auto_backend(device_name, seq_len, head_dim, dtype, kernel_params, mode, directory, generation) -> str:
    tuned = tuned_backend(device_name, seq_len, head_dim, dtype, kernel_params, mode)
    return tuned or default_backend(seq_len, head_dim, dtype, kernel_params, mode)
