"""The typed config: presets, overrides, the plain-dict round trip, and the preset tables users read."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from adclr.config import (
    BOUNDS,
    CHOICES,
    FIELD_GROUP,
    GROUPS,
    PAIRS,
    PRESETS,
    ConfigError,
    TrainConfig,
    check_field,
    make_config,
    preset_table,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_preset_sets_exactly_the_fields_without_a_default():
    fields = [f for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    for name, values in PRESETS.items():
        assert set(values) == required, name
    assert len(FIELD_GROUP) == len(fields), "two groups share a field name"


def test_preset_follows_data_path_unless_chosen():
    assert make_config().preset == "builtin"
    assert make_config().model.arch == PRESETS["builtin"]["arch"]
    paper = make_config(data_path="/data/imagenet")
    assert paper.preset == "paper" and paper.flat() == {**paper.flat(), **PRESETS["paper"]}
    chosen = make_config("builtin", data_path="/data/imagenet")
    assert chosen.preset == "builtin" and chosen.data.data_path == "/data/imagenet"
    assert chosen.flat() == {**chosen.flat(), **PRESETS["builtin"]}
    assert make_config("paper").optim.epochs == PRESETS["paper"]["epochs"]


def test_user_values_beat_the_preset_and_defaults():
    config = make_config(data_path="/data", arch="vit_tiny", lr=0.1, weight_decay=0.2, query_scale=[0.1, 0.2])
    assert config.preset == "paper"
    assert (config.model.arch, config.optim.lr, config.optim.weight_decay) == ("vit_tiny", 0.1, 0.2)
    assert config.data.query_scale == (0.1, 0.2)  # lists (argparse nargs) become the fields' tuples
    assert config.model.patch_size == PRESETS["paper"]["patch_size"]  # the rest still from the preset


def test_bad_names_are_refused():
    with pytest.raises(TypeError, match="unknown config field.*'learning_rate'"):
        make_config(learning_rate=0.1)
    with pytest.raises(ValueError, match="preset must be one of"):
        make_config("large")


def test_plain_dict_round_trip_and_top_level_fields():
    config = make_config("builtin", epochs=3, seed=7, num_query=2, query_keys="raw", bidirectional=True)
    data = config.to_dict()
    json.dumps(data)  # plain containers only
    assert TrainConfig.from_dict(data) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(data))) == config  # lists back to tuples
    expected = dict(arch="vit_pico", patch_size=8, global_size=48, seed=7, num_query=2, query_keys="raw")
    assert {name: getattr(config, name) for name in expected} == expected and config.bidirectional is True


def test_from_dict_refuses_what_it_cannot_represent():
    data = make_config().to_dict()
    with pytest.raises(ValueError, match="unknown field.*'colour'.*'model'"):
        TrainConfig.from_dict({**data, "model": {**data["model"], "colour": 1}})
    with pytest.raises(ValueError, match="'optim' lacks \\['lr'\\]"):
        TrainConfig.from_dict({**data, "optim": {k: v for k, v in data["optim"].items() if k != "lr"}})
    with pytest.raises(ValueError, match="unknown config section"):
        TrainConfig.from_dict({**data, "extras": {}})
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig.from_dict({**data, "preset": "huge"})
    defaults_added_later = {**data, "run": {}}  # a field added with a default later still reads old dicts
    assert TrainConfig.from_dict(defaults_added_later).run.output_dir == "runs/adclr"


def test_help_and_readme_list_every_preset_value():
    table = preset_table()
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert rows == {f"--{f}": [str(PRESETS[p][f]) for p in PRESETS] for f in PRESETS["paper"]}
    readme = open(os.path.join(ROOT, "README.md")).read()
    readme_rows = dict(re.findall(r"^\| `--(\w+)` \| (.+) \|$", readme, flags=re.M))
    for field in PRESETS["paper"]:
        cells = [cell.strip(" `") for cell in readme_rows[field].split("|")]
        assert cells == [str(PRESETS[p][field]) for p in PRESETS], field


@pytest.mark.parametrize(
    "values, field, message",
    [
        (dict(num_query=-1), "num_query", "must be an integer >= 0, got -1"),
        (dict(lambda_query=-5), "lambda_query", "must be a number >= 0, got -5"),
        (dict(epochs=0), "epochs", "must be an integer >= 1, got 0"),
        (dict(epochs=2.0), "epochs", "must be an integer >= 1, got 2.0"),
        (dict(batch_size_per_gpu=0), "batch_size_per_gpu", "must be an integer >= 1, got 0"),
        (dict(teacher_temp=0.0), "teacher_temp", r"must be a number in \(0, 1\], got 0.0"),
        (dict(lr=float("inf")), "lr", "must be a number >= 0, got inf"),
        (dict(momentum_teacher=1.5), "momentum_teacher", r"must be a number in \[0, 1\), got 1.5"),
        (dict(momentum_teacher=1.0), "momentum_teacher", r"must be a number in \[0, 1\), got 1.0"),
        (dict(out_dim=1), "out_dim", "must be an integer >= 2, got 1"),
        (dict(teacher_temp=100.0), "teacher_temp", r"must be a number in \(0, 1\], got 100.0"),
        (dict(local_size=56), "local_size", r"must be at most the global crops' size \(--global_size 48\), got 56"),
        (dict(lr=1e-3, min_lr=2e-3), "min_lr", r"must be at most the peak learning rate \(--lr 0.001\), got 0.002"),
        (dict(drop_path_rate=1.0), "drop_path_rate", r"must be a number in \[0, 1\), got 1.0"),
        (dict(query_scale=(0.2, 0.1)), "query_scale", r"must be \(min, max\) with min <= max, got \(0.2, 0.1\)"),
        (dict(local_crops_scale=(0.0, 0.4)), "local_crops_scale", r"must be two numbers in \(0, 1\]"),
        (dict(global_crops_scale=(0.4,)), "global_crops_scale", r"must be a \(min, max\) pair"),
        (dict(global_size=36), "global_size", r"must be a multiple of the patch size \(8\), got 36"),
        (dict(local_size=12), "local_size", r"must be a multiple of the patch size \(8\), got 12"),
        (dict(arch="vit_huge"), "arch", "must be one of .*'vit_pico'.*, got 'vit_huge'"),
        (dict(attn_backend="flash"), "attn_backend", "must be one of .*'sdpa'.*, got 'flash'"),
        (dict(precision="fp8"), "precision", "must be one of .*'bf16'.*, got 'fp8'"),
        (dict(norm_last_layer=1), "norm_last_layer", "must be True or False, got 1"),
        (dict(seed=-1), "seed", r"must be an integer in \[0, 4294967295\], got -1"),
    ],
)
def test_the_python_api_refuses_what_the_command_line_refuses(values, field, message):
    with pytest.raises(ConfigError, match=f"^{field} {message}") as caught:
        make_config(**values)
    assert caught.value.field == field and isinstance(caught.value, ValueError)
    data = make_config().to_dict()  # a checkpoint's config holding the value is refused the same way
    group = FIELD_GROUP[field]
    with pytest.raises(ConfigError, match=f"^{field} "):
        TrainConfig.from_dict({**data, group: {**data[group], **values}})


def test_values_the_run_does_not_use_are_not_checked_against_it():
    assert make_config(local_crops_number=0, local_size=12).data.local_size == 12  # no local crops
    assert make_config(num_query=0, lambda_query=3.0).loss.lambda_query == 3.0  # nothing to weigh, nothing to say
    assert make_config(precision=None).optim.precision is None  # chosen once the device is known


def test_every_numeric_field_has_bounds_and_every_name_field_its_choices():
    from adclr import kernels, model, train_step

    for group in GROUPS.values():
        for f in dataclasses.fields(group):
            if f.type in ("int", "float", "tuple[float, float]"):
                assert f.name in BOUNDS, f"{f.name} has no range"
            if f.type in ("str", "str | None") and f.name not in ("data_path", "eval_data_path", "output_dir"):
                assert f.name in CHOICES, f"{f.name} has no list of names"
    assert set(PAIRS) == {f for f in BOUNDS if f.endswith("scale")}
    # one source of truth for the names: the library accepts exactly what the config does
    assert CHOICES["attn_backend"] is kernels.BACKENDS and CHOICES["query_keys"] is kernels.QUERY_KEY_RULES
    assert CHOICES["arch"] == tuple(model.ARCHS) and CHOICES["precision"] == tuple(train_step.AUTOCAST_DTYPES)


def test_every_bound_holds_at_its_ends():
    for name, bounds in BOUNDS.items():
        pair = name in PAIRS
        for value, ok in [(bounds.low, not bounds.low_open), (bounds.high, not bounds.high_open)]:
            if value is None:
                continue
            value = (value, value) if pair else value
            if ok:
                check_field(name, value)
            else:
                with pytest.raises(ConfigError, match=f"^{name} "):
                    check_field(name, value)
        if bounds.low is not None and not bounds.low_open:  # just below a closed lower end
            below = bounds.low - (1 if bounds.integer else 1e-9)
            with pytest.raises(ConfigError, match=f"^{name} "):
                check_field(name, (below, below) if pair else below)


@pytest.mark.slow
def test_command_line_picks_the_preset_and_lets_flags_win(tmp_path):
    """train.py with --data_path and no --preset uses the paper's preset, --preset builtin is honoured,
    a flag beats its preset value; the run stops early because 2 images make less than one batch."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 100, 0, 0)).save(images / f"{i}.png")

    def train(*flags):
        command = [sys.executable, os.path.join(ROOT, "train.py"), "--output_dir", str(tmp_path / "out"), *flags]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)

    paper = train("--data_path", str(images), "--lr", "0.01")
    assert paper.returncode == 2
    assert "preset paper (--data_path given): arch=vit_small" in paper.stdout
    assert "overridden by flags: lr=0.01" in paper.stdout
    assert "fewer than one batch of 64 per process" in paper.stderr
    config = json.loads(paper.stdout.split("config: ", 1)[1].splitlines()[0])
    assert config["optim"]["lr"] == 0.01 and config["model"]["out_dim"] == 65536

    builtin = train("--preset", "builtin", "--data_path", str(images), "--batch_size_per_gpu", "3")
    assert "preset builtin (--preset): arch=vit_pico" in builtin.stdout
    assert "fewer than one batch of 3 per process" in builtin.stderr

    usage = train("--help")
    assert usage.returncode == 0
    assert preset_table() in usage.stdout
