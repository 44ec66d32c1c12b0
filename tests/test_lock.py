"""The committed dvc.lock matches the code and config of this tree: on a clean
copy of the tracked files, `dvc status` may report missing data and models,
nothing else (a stale lock makes every fresh clone retrain)."""

import json
import os
import sys
from pathlib import Path

import yaml

from conftest import copy_checkout, run_ok
from pipeline.config import PROJECT_ROOT

MISSING = {"deleted", "not in cache"}


def test_the_committed_lock_matches_code_and_params(tmp_path):
    repo = copy_checkout(tmp_path / "clone", untracked=False)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run_ok(["git", "init", "-q"], repo, env)
    status = json.loads(run_ok(["dvc", "status", "--json"], repo, env) or "{}")
    wrong = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):  # e.g. "changed command"
                wrong.setdefault(stage, []).append(change)
                continue
            for kind, paths in change.items():
                for path, state in paths.items():
                    data = kind in ("changed outs",) or path.startswith(("data/", "models/"))
                    if not (data and state in MISSING):
                        wrong.setdefault(stage, []).append(f"{kind}: {path}: {state}")
    assert not wrong, f"dvc.lock is stale; run `dvc repro` and commit dvc.lock: {wrong}"


def test_the_lock_records_exactly_the_deps_dvc_yaml_lists():
    """DVC skips a stage whose listed deps are unchanged and leaves the lock's entries of
    deps dropped from dvc.yaml in place; a fresh clone's repro then rewrites dvc.lock."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((PROJECT_ROOT / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(stages)
    for name, stage in stages.items():
        listed = sorted(stage.get("deps", []))
        recorded = sorted(dep["path"] for dep in lock[name].get("deps", []))
        assert recorded == listed, f"dvc.lock stage {name}: run `dvc repro -f -s {name}` and commit dvc.lock"
