"""The sweeper's shape: declared layers, Optuna's and MLflow's private names each in one module,
no torch, a light plugin scan."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

import hydra_plugins.mlflow_study_sweeper as package

PLUGIN = Path(__file__).resolve().parent.parent
SOURCE = Path(package.__file__).parent
MODULES = sorted(p.stem for p in SOURCE.glob("*.py") if p.stem != "__init__")
# every private name of Optuna the sweeper needs; only _optuna_internals may use them
OPTUNA_PRIVATE = {
    "_storage",
    "_study_id",
    "_trial_id",
    "_backend",
    "_file_path",
    "_contains",
    "_get_unvisited_grid_ids",
    "_n_min_trials",
}


def tree(module: str) -> ast.Module:
    return ast.parse((SOURCE / f"{module}.py").read_text())


def test_every_module_is_in_a_declared_layer():
    config = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    named = {m.strip() for layer in contract["layers"] for m in layer.split("|")}
    assert sorted(named) == MODULES  # a new module must be placed, so its imports are checked


def test_the_layers_hold():
    """import-linter's layers contract (independent siblings: no cycle is possible either)."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        cwd=PLUGIN,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_only_optuna_internals_touches_optunas_private_names():
    found = []
    for module in MODULES:
        if module == "_optuna_internals":
            continue
        for node in ast.walk(tree(module)):
            if isinstance(node, ast.Attribute) and node.attr in OPTUNA_PRIVATE:
                found.append(f"{module}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
                private = [p for p in node.module.split(".") if p.startswith("_")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    found.append(f"{module}:{node.lineno} from {node.module}")
    assert found == []
    uses = [
        node.attr
        for node in ast.walk(tree("_optuna_internals"))
        if isinstance(node, ast.Attribute) and node.attr in OPTUNA_PRIVATE
    ]
    assert set(uses) == OPTUNA_PRIVATE  # the list above is the one in use


def test_only_mlflow_internals_touches_mlflows_private_names():
    found = []
    for module in MODULES:
        if module == "_mlflow_internals":
            continue
        for node in ast.walk(tree(module)):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlflow"):
                names = [*node.module.split("."), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [
                    p for a in node.names if a.name.startswith("mlflow") for p in a.name.split(".")
                ]
            if any(n.startswith("_") for n in names):
                found.append(f"{module}:{node.lineno}")
    assert found == []


def test_no_module_imports_torch_and_only_the_callback_imports_lightning():
    imports: dict[str, set[str]] = {}
    for module in MODULES:
        for node in ast.walk(tree(module)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                imports.setdefault(name.split(".")[0], set()).add(module)
    assert "torch" not in imports
    assert imports.get("pytorch_lightning") == {"_lightning"}
    assert "lightning" not in imports


def test_hydras_plugin_scan_imports_neither_optuna_nor_mlflow():
    code = (
        "import sys; from hydra.core.plugins import Plugins; Plugins.instance(); "
        "print(sorted(m for m in ('optuna', 'mlflow', 'torch', 'sqlalchemy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
