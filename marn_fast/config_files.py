"""Config files for `marn-fast train`, `demo` and `tune`: the shipped recipes (configs/*.yaml, installed
as the package data `marn_fast/configs/`), reading a YAML or JSON file of options and checking it
against the command line's own options, and which recipe a run applies by default.

Precedence: the parser's defaults (the package defaults: the official MARN recipe, or LAAT's
with --model laat) < the config file (--config FILE, or the default recipe: demo.yaml for `demo`,
codiesp-<language>-D.yaml for `train --data codiesp`, laat-codiesp-<language>-D.yaml for
`train --model laat --data codiesp`) < flags given on the command line. `--recipe official`
applies no shipped config. Bad files raise ValueError naming the file and the key (the CLI prints
it on one line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
RECIPES = ("auto", "official")
# Options a config file may not set: they choose the config itself.
CONFIG_ONLY_FLAGS = ("config", "recipe")


def shipped_config_dir() -> Path:
    """The folder of the shipped recipes: `marn_fast/configs/` in an installed package (the
    repository's `configs/` shipped as package data), else `configs/` of the source checkout
    (an in-place or editable install)."""
    package = Path(__file__).resolve().parent
    if (package / "configs").is_dir():
        return package / "configs"
    checkout = package.parent
    if (checkout / "configs").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "configs"
    raise ValueError(f"the shipped configs are missing (looked in {package / 'configs'} and {checkout / 'configs'}); "
                   "reinstall with `pip install --no-build-isolation .`")


def shipped_configs() -> list[Path]:
    """Every shipped recipe, sorted by name."""
    return sorted(shipped_config_dir().glob("*.yaml"))


def resolve_config_path(spec: str) -> Path:
    """A config file: `spec` as a path when it exists, else a shipped config of that name
    (`codiesp-en-D`, `codiesp-en-D.yaml` or `configs/codiesp-en-D.yaml`, from any directory)."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        name = path.name if path.suffix in CONFIG_SUFFIXES else f"{path.name}.yaml"
        shipped = shipped_config_dir() / name
        if shipped.is_file():
            return shipped
    names = ", ".join(p.stem for p in shipped_configs())
    raise ValueError(f"--config {spec}: no such file, and no shipped config of that name (shipped: {names})")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (needs PyYAML) or JSON mapping of option names (dashes or underscores) to values."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ValueError(f"config {path}: YAML needs PyYAML: `pip install pyyaml` "
                           "(it is in requirements/data.txt), or give a JSON file") from exc
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config {path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config {path}: not valid JSON ({exc})") from exc
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"config {path}: expected a mapping of option names to values, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """`value` as the option `action` would parse it; ValueError naming the key when it cannot be."""
    key = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if value is None:
        if action.default is not None:
            raise ValueError(f"{where}: {key} cannot be null")
        return None
    if action.nargs in ("+", "*"):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            raise ValueError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce_scalar(action, v, where) for v in value]
    return _coerce_scalar(action, value, where)


def _coerce_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    key = action.dest
    kind: Any = action.type or str
    kind_name = {int: "an integer", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", "?"))
    try:
        fractional = kind is int and isinstance(value, float) and not value.is_integer()
        if isinstance(value, (bool, dict, list)) or fractional:
            raise ValueError(value)
        if kind is str:  # `labels: 50` reads as an int in YAML
            if not isinstance(value, (str, int)):
                raise ValueError(value)
            converted = str(value)
        else:  # YAML reads 3e-2 (no dot) as a string: float("3e-2") takes it
            converted = kind(int(value) if kind is int and isinstance(value, float) else value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {key} must be {kind_name}, got {value!r}") from exc
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where}: {key} must be one of {list(action.choices)}, got {converted!r}")
    return converted


def config_values(subparser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """The config file's options, checked against `subparser`'s: unknown keys, wrong types and
    values outside an option's choices are errors naming the key."""
    values = load_config_file(path)
    actions = {a.dest: a for a in subparser._actions if a.dest not in ("help",) + CONFIG_ONLY_FLAGS}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"config {path}: unknown keys {unknown}")
    return {key: _coerce(actions[key], value, f"config {path}") for key, value in values.items()}


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _given_options(subparser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options given on the command line (parsed again with every default suppressed)."""
    saved = [(a, a.default) for a in subparser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = subparser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(given)) - set(subparser._defaults)


def default_recipe(args: argparse.Namespace) -> Optional[Path]:
    """The shipped config a run applies when no --config is given: `demo.yaml` for `demo`, the
    CodiEsp recipe of the language for `train --data codiesp` (and `tune`) (measured on diagnoses: codiesp-<lang>-D
    also for --codes P/DP; laat-codiesp-<lang>-D with --model laat), none otherwise (the package
    defaults are the official MARN recipe, and LAAT's with --model laat)."""
    if getattr(args, "recipe", "official") == "official":
        return None
    if args.command == "demo":
        return shipped_config_dir() / "demo.yaml"
    if args.command in ("train", "tune") and args.data == "codiesp":
        model = "" if getattr(args, "model", "marn") == "marn" else f"{args.model}-"
        return shipped_config_dir() / f"{model}codiesp-{args.language}-D.yaml"
    return None


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 argv: Optional[Sequence[str]]) -> Optional[dict[str, Any]]:
    """Fill the options not given on the command line from --config FILE, or from the shipped
    recipe a run applies by default (`default_recipe`); print which config was applied.
    Returns the record a run's manifest keeps (None when no config applies)."""
    if args.command not in ("train", "demo", "tune"):  # tune --data-dir: the keys of the run it prepares
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    subparser = _subparser(parser, args.command)
    path: Optional[Path]
    if args.config:
        path, how = resolve_config_path(args.config), "--config"
    else:
        path = default_recipe(args)
        if path is None:
            return None
        how = "the demo's default" if args.command == "demo" else \
            f"the default for --data codiesp --language {args.language}"
    values = config_values(subparser, path)
    given = _given_options(subparser, argv[1:])
    overridden = {key: getattr(args, key) for key in sorted(given & set(values)) if getattr(args, key) != values[key]}
    for key, value in values.items():
        if key not in given:
            setattr(args, key, value)
    shipped = path.resolve().parent == shipped_config_dir().resolve()
    record = {"name": path.name, "path": str(path.resolve()), "shipped": shipped, "applied": how,
              "values": values, "overridden_by_flags": overridden}
    line = f"config: {path.name}" + (" (shipped recipe" if shipped else " (") + f", {how}): {path}"
    if overridden:
        line += "; overridden by flags: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in overridden.items())
    if how != "--config":
        official = "LAAT's defaults" if getattr(args, "model", "marn") == "laat" else "the official MARN recipe"
        line += f"; `--recipe official` runs the package defaults ({official}) instead"
        if args.command == "train" and args.codes != "D":
            line += f". Its values were measured on diagnoses (codes D), not on --codes {args.codes}"
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(line, flush=True)
    return record
