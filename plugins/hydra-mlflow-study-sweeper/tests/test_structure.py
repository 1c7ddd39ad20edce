"""The sweeper's shape: a facade for Hydra over a core in subpackages, declared layers, Optuna's
and MLflow's private names each in one module, no torch, a light plugin scan, no module-level
value written by one module and read by another, the environment written in one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

import hydra_plugins.mlflow_study_sweeper as facade
import mlflow_study_sweeper as core

PLUGIN = Path(__file__).resolve().parent.parent
CORE = Path(core.__file__).parent
FACADE = Path(facade.__file__).parent
# every module of the core, by its dotted name under the core ("sweep.loop", "keys")
MODULES = sorted(
    ".".join(p.relative_to(CORE).with_suffix("").parts)
    for p in CORE.rglob("*.py")
    if p.name != "__init__.py"
)
# every private name of Optuna the sweeper needs; only storage.optuna_internals may use them
OPTUNA_PRIVATE = {
    "_storage",
    "_study_id",
    "_trial_id",
    "_backend",
    "_file_path",
    "_contains",
    "_get_unvisited_grid_ids",
    "_n_min_trials",
    "_suggest",
}


def tree(module: str) -> ast.Module:
    return ast.parse((CORE / (module.replace(".", "/") + ".py")).read_text())


def contracts() -> list[dict]:
    return tomllib.loads((PLUGIN / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]


def test_the_facade_is_what_hydras_scan_imports_and_no_more():
    assert sorted(p.name for p in FACADE.glob("*.py")) == [
        "__init__.py",
        "cli.py",
        "config.py",
        "job.py",
        "mlflow_study_sweeper.py",
    ]
    assert not [p for p in FACADE.iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_every_module_of_the_core_is_in_a_declared_layer():
    (layers,) = [c for c in contracts() if c.get("containers") == ["mlflow_study_sweeper"]]
    named = {m.strip() for layer in layers["layers"] for m in layer.split("|")}
    # a subpackage's layer holds all its modules; a module at the top has a layer of its own
    placed = {m for m in MODULES if m.split(".")[0] in named}
    assert placed == set(MODULES)
    assert named == {m.split(".")[0] for m in MODULES}  # no layer names a package that is gone


def test_the_layers_hold():
    """import-linter's contracts: the facade over the core, and the core's subpackages."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        cwd=PLUGIN,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout


def test_only_optuna_internals_touches_optunas_private_names():
    found = []
    for module in MODULES:
        if module == "storage.optuna_internals":
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
        for node in ast.walk(tree("storage.optuna_internals"))
        if isinstance(node, ast.Attribute) and node.attr in OPTUNA_PRIVATE
    ]
    assert set(uses) == OPTUNA_PRIVATE  # the list above is the one in use


def test_only_mlflow_internals_touches_mlflows_private_names():
    found = []
    for module in MODULES:
        if module == "tracking.mlflow_internals":
            continue
        for node in ast.walk(tree(module)):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlflow."):
                names = [*node.module.split("."), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [
                    p for a in node.names if a.name.startswith("mlflow.") for p in a.name.split(".")
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
    assert imports.get("pytorch_lightning") == {"trial.lightning"}
    assert "lightning" not in imports


def test_hydras_plugin_scan_imports_neither_optuna_nor_mlflow():
    code = (
        "import sys; from hydra.core.plugins import Plugins; Plugins.instance(); "
        "print(sorted(m for m in ('optuna', 'mlflow', 'torch', 'sqlalchemy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_short_job_import_loads_the_standard_library_only():
    code = (
        "import sys; from mlflow_study_sweeper import report, continues, checkpoint_saved; "
        "print(sorted(m for m in ('optuna', 'mlflow', 'hydra', 'sqlalchemy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_old_job_import_is_the_new_one():
    import mlflow_study_sweeper as new
    from hydra_plugins.mlflow_study_sweeper import job
    from hydra_plugins.mlflow_study_sweeper.job import (
        PruningCallback as OldCallback,
    )
    from hydra_plugins.mlflow_study_sweeper.job import (
        checkpoint_saved,
        continues,
        current_trial,
        report,
    )

    assert (report, continues, checkpoint_saved, current_trial) == (
        new.report,
        new.continues,
        new.checkpoint_saved,
        new.current_trial,
    )
    assert OldCallback is new.PruningCallback
    assert sorted(job.__all__) == sorted(new.__all__)
    for name in new.__all__:
        assert getattr(job, name) is getattr(new, name)


def _module_aliases(module: ast.Module) -> set[str]:
    """The names under which a module imports the core's modules (keys, job_side, ...)."""
    out = set()
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "mlflow_study_sweeper"
        ):
            for alias in node.names:
                name = alias.asname or alias.name
                target = f"{node.module}.{alias.name}".removeprefix("mlflow_study_sweeper.")
                if target in MODULES:
                    out.add(name)
    return out


def test_no_module_writes_another_modules_globals():
    """A module-level value is written only by the module that defines it: no
    `other.NAME = ...`, `other.NAME[key] = ...`, `other.NAME.append(...)`, and no `global`
    rebinding from a function (state lives in objects that are passed, not in modules)."""
    found = []
    mutators = {"append", "extend", "update", "setdefault", "pop", "clear", "add", "discard"}
    for module in MODULES:
        parsed = tree(module)
        aliases = _module_aliases(parsed)
        for node in ast.walk(parsed):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            elif isinstance(node, ast.Delete):
                targets = node.targets
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in mutators
            ):
                targets = [node.func.value]
            for target in targets:
                while isinstance(target, (ast.Subscript, ast.Attribute)):
                    inner = target.value
                    if isinstance(inner, ast.Name) and inner.id in aliases:
                        found.append(f"{module}:{node.lineno} writes {inner.id}.")
                        break
                    target = inner
            if isinstance(node, ast.Global):
                found.append(f"{module}:{node.lineno} global {', '.join(node.names)}")
    assert found == []


def test_the_environment_is_written_in_one_place():
    """os.environ is written by the job contract alone (what a worker or job inherits)."""
    found = []
    writes = {"setdefault", "pop", "update", "clear", "__setitem__", "__delitem__"}
    for module in MODULES:
        if module == "contract":
            continue
        for node in ast.walk(tree(module)):
            target = None
            if isinstance(node, (ast.Assign, ast.Delete)):
                for t in node.targets:
                    if isinstance(t, ast.Subscript):
                        target = t.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in writes:
                    target = node.func.value
                if node.func.attr == "putenv":
                    target = node.func.value
            if target is not None and ast.unparse(target) in ("os.environ", "os"):
                found.append(f"{module}:{node.lineno} {ast.unparse(node)[:60]}")
    assert found == []
