"""The shipped recipes (configs/*.yaml): every one loads and validates, the official-recipe files
equal the package defaults, they ship as package data, and bad config files give one-line errors
naming the key."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("yaml")

from marn_fast.cli import (  # noqa: E402
    MODEL_DEPENDENT_FLAGS,
    build_parser,
    model_dependent_default,
    settings_from_args,
)
from marn_fast.config import config_from_dict  # noqa: E402
from marn_fast.config_files import apply_config, config_values, shipped_config_dir, shipped_configs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"codiesp-en-D", "codiesp-es-D", "demo", "laat-codiesp-en-D", "laat-codiesp-es-D", "mimic3-50",
            "mimic3-full"}
OFFICIAL = ("mimic3-full", "mimic3-50")
# Keys that pick the data rather than the recipe.
DATA_KEYS = {"data", "labels", "top50", "ccs"}


def _apply(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    return args, apply_config(parser, args, argv)


def test_the_expected_configs_are_shipped():
    assert {p.stem for p in shipped_configs()} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_config_loads_and_validates(name, tmp_path, capsys):
    args, record = _apply(["train", "--config", name, "--out", str(tmp_path)])
    assert record["name"] == f"{name}.yaml" and record["shipped"] and record["values"]
    assert f"config: {name}.yaml" in capsys.readouterr().out
    for key, value in record["values"].items():
        assert getattr(args, key) == value
    settings, train, options = settings_from_args(args, tmp_path)  # DataSettings and TrainConfig check themselves
    options.pop("no_mtl", None)
    sizes = {"vocab_size": 10, "num_icd": 5} if options.get("model") == "laat" else {"vocab_size": 10, "num_icd": 5,
                                                                                    "num_ccs": 3}
    config_from_dict({**options, **sizes})  # and the model options
    assert train.lr > 0 and settings.batch_size >= 1
    first = (shipped_config_dir() / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# "), "each config starts with a comment saying where its numbers come from"


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_recipe_files_equal_the_package_defaults(name):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["train"]
    defaults = {a.dest: model_dependent_default("marn", a.dest) if a.default is None and a.dest in MODEL_DEPENDENT_FLAGS
                else a.default for a in sub._actions}
    values = config_values(sub, shipped_config_dir() / f"{name}.yaml")
    metric = values.pop("metric")
    from marn_fast.training import TrainConfig

    assert metric == TrainConfig.__dataclass_fields__["metric"].default
    drift = {k: (v, defaults[k]) for k, v in values.items() if k not in DATA_KEYS and v != defaults[k]}
    assert not drift, f"{name}.yaml differs from the package defaults (file, default): {drift}"
    assert len(values) > 15  # the whole recipe is written out


def test_codiesp_recipe_holds_the_measured_flags():
    # results/codiesp-2026-11-28-recipe/README.md: the en-D-dm runs
    values = _apply(["train", "--config", "codiesp-en-D"])[1]["values"]
    assert values == {"data": "codiesp", "language": "en", "codes": "D", "aux": "ccsr", "metric": "map",
                      "hidden_size": 64, "word2vec_epochs": 100, "lr": 3e-2, "weight_decay": 0.3,
                      "decay_matrices_only": True, "bn_recalibrate": True, "epochs": 100, "patience": 15}
    spanish = _apply(["train", "--config", "codiesp-es-D"])[1]["values"]
    assert spanish == {**values, "language": "es"}


def test_configs_ship_as_package_data():
    """The installed package holds the same configs as the repository (a wheel copies configs/
    into marn_fast/configs/), and the package list names every sub-package."""
    source = REPO / "configs"
    if source.is_dir():
        shipped = {p.name: p.read_text() for p in shipped_configs()}
        assert shipped == {p.name: p.read_text() for p in source.glob("*.yaml")}
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.skip("tomllib: Python 3.11+")
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no source checkout")
    setuptools = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    subpackages = {"marn_fast." + ".".join(p.parent.relative_to(REPO / "marn_fast").parts)
                   for p in (REPO / "marn_fast").rglob("__init__.py") if p.parent != REPO / "marn_fast"}
    assert set(setuptools["packages"]) == {"marn_fast", "marn_fast.configs"} | subpackages
    assert setuptools["package-dir"]["marn_fast.configs"] == "configs"
    assert "*.yaml" in setuptools["package-data"]["marn_fast.configs"]
    assert "py.typed" in setuptools["package-data"]["marn_fast"]


def test_yaml_values_are_coerced_and_checked(tmp_path):
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    good = tmp_path / "good.yaml"
    good.write_text("lr: 3e-2\nlabels: 50\nepochs: 4.0\nseeds: [1, 2]\nmax-minutes: null\n")
    assert config_values(sub, good) == {"lr": 0.03, "labels": "50", "epochs": 4, "seeds": [1, 2], "max_minutes": None}
    cases = {"lr: fast\n": "lr must be a number", "epochs: 2.5\n": "epochs must be an integer",
             "codes: X\n": "codes must be one of", "no_ram: 1\n": "no_ram must be true or false",
             "seeds: 3\n": "seeds must be a list", "hiden_size: 3\n": "unknown keys ['hiden_size']",
             "config: other.yaml\n": "unknown keys ['config']", "- 1\n": "expected a mapping",
             "lr: [\n": "not valid YAML", "epochs: null\n": "epochs cannot be null"}
    for text, message in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            config_values(sub, bad)


def test_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("demo", "demo.yaml", "configs/demo.yaml"):
        assert _apply(["demo", "--config", spec])[1]["path"] == str((shipped_config_dir() / "demo.yaml").resolve())
    with pytest.raises(ValueError, match="no shipped config of that name.*codiesp-en-D"):
        _apply(["train", "--config", "nope"])
