"""The architecture, enforced: stages on top, core/data/report below, tracking the
only importer of mlflow, and every stage's code deps in dvc.yaml exactly the
files its imports reach."""

import ast
import re
import subprocess
import sys

import pytest
import yaml

from pipeline.config import PROJECT_ROOT

SRC = PROJECT_ROOT / "src"
PACKAGE = SRC / "pipeline"
STAGES = ("resolve", "fetch", "normalise", "train", "evaluate", "export_filters")
SHARED = ("config", "entry", "errors")  # the package's top level besides the stages
# The schema reaches the stages after resolve as values in params/resolved.yaml (checked by
# pipeline.entry against what they compose), so it is a code dep of resolve only.
SCHEMA = {"pipeline.config", "pipeline.core.hparams"}


def _modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path):
    """Dotted names imported anywhere in the file (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _pipeline_imports(module):
    """The pipeline modules `module` imports, with the packages Python imports on the way."""
    found = set()
    for name in _imports(MODULES[module]):
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in MODULES:
                found.add(".".join(parts[:i]))
    return found - {module}


def _closure(module):
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += _pipeline_imports(current)
    return seen


def _has_code(path):
    """False for a file that is only a docstring (a package's __init__): it cannot change a result."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def test_the_core_loads_without_hydra_omegaconf_or_mlflow():
    core = sorted(name for name in MODULES if name.startswith("pipeline.core."))
    code = (f"import sys\nfor m in {core!r}: __import__(m)\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'mlflow')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("module", sorted(MODULES))
def test_import_rules(module):
    imported = _imports(MODULES[module])
    roots = {name.split(".")[0] for name in imported}
    if not module.startswith("pipeline.tracking"):
        assert "mlflow" not in roots, f"{module} imports mlflow: only pipeline.tracking may"
    if module.startswith("pipeline.core"):
        assert not roots & {"hydra", "omegaconf", "mlflow"}, f"{module} (core) imports {roots}"
    stages_imported = {f"pipeline.{s}" for s in STAGES} & _pipeline_imports(module)
    assert not stages_imported, f"{module} imports the stage(s) {stages_imported}"


def test_the_top_level_holds_only_the_stages_config_errors_and_the_entry_point():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == set(STAGES) | set(SHARED)


def _dvc_stages():
    return yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_what_the_stage_imports(stage):
    deps = [d for d in _dvc_stages()[stage]["deps"] if d.startswith("src/")]
    modules = _closure(f"pipeline.{stage}") - (set() if stage == "resolve" else SCHEMA)
    needed = {MODULES[m] for m in modules if _has_code(MODULES[m])}
    covered = lambda path, dep: path == PROJECT_ROOT / dep or (PROJECT_ROOT / dep) in path.parents
    missing = sorted(str(p.relative_to(PROJECT_ROOT)) for p in needed if not any(covered(p, d) for d in deps))
    assert not missing, f"dvc.yaml stage {stage}: imports reach {missing}, not listed in deps"
    unused = [d for d in deps if not any(covered(p, d) for p in needed)]
    assert not unused, f"dvc.yaml stage {stage}: deps {unused} are not imported (reruns for nothing)"


def test_stage_commands_are_the_modules_users_type_and_read_only_their_deps():
    for name, spec in _dvc_stages().items():
        cmd = " ".join(spec["cmd"].split())
        assert cmd.startswith(f"python -m pipeline.{name} ")
        for read in re.findall(r"paths\.\w+=(\S+)", cmd):  # conf/'s paths never reach a DVC stage
            assert any(dep == read or dep.startswith(f"{read}/") for dep in spec["deps"]), (name, read)
