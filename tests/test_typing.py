"""Every public function and method of the public API (the package root, the model, the config and
the ops; what mypy checks in .ci/run) carries type hints on each parameter and its return."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import marn_fast.ops

PUBLIC_MODULES = ["marn_fast", "marn_fast.model", "marn_fast.config", "marn_fast.ops"] + [
    f"marn_fast.ops.{m.name}" for m in pkgutil.iter_modules(marn_fast.ops.__path__)]


def _functions(module_name: str):
    """(qualified name, function) of the public functions and methods defined in the module."""
    module = importlib.import_module(module_name)
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isfunction(obj):
            yield f"{module_name}.{name}", obj
        elif inspect.isclass(obj):
            for method_name, method in vars(obj).items():
                if method_name.startswith("_") and method_name != "__init__":
                    continue
                if isinstance(method, (staticmethod, classmethod)):
                    method = method.__func__
                elif isinstance(method, property):
                    method = method.fget
                if inspect.isfunction(method):
                    yield f"{module_name}.{name}.{method_name}", method


def _missing_hints(function) -> list[str]:
    hints = function.__annotations__
    missing = [name for name in inspect.signature(function).parameters
               if name not in ("self", "cls") and name not in hints]
    if "return" not in hints and function.__name__ != "__init__":
        missing.append("return")
    return missing


def test_public_functions_have_type_hints():
    found = {name: _missing_hints(f) for module in PUBLIC_MODULES for name, f in _functions(module)}
    assert len(found) > 40, f"too few public functions found ({len(found)}): the walk is broken"
    missing = {name: hints for name, hints in found.items() if hints}
    assert not missing, f"public functions without type hints (parameter or return): {missing}"


def test_the_check_sees_a_missing_hint():
    def unhinted(a, b: int):
        return a + b

    assert _missing_hints(unhinted) == ["a", "return"]
