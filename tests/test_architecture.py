"""SPEC §7: imports run one way, and the control plane loads nothing heavy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from procs import ROOT

PACKAGES = ("engine", "worker", "router", "manager", "clusterkit")


def test_router_and_manager_load_no_torch_engine_or_worker():
    code = ("import sys, router.app, router.cli, manager.app, manager.cli, manager.embedded_redis; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'engine', 'worker', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def _lint(tree) -> subprocess.CompletedProcess:
    """``lint-imports`` on a copy of the packages (the copy shadows the installed ones)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=tree, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(tree)})


def test_import_contracts_hold_and_catch_a_forbidden_import(tmp_path):
    for p in PACKAGES:
        shutil.copytree(ROOT / p, tmp_path / p, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    ok = _lint(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The router reaching into the worker (as it once did for its CLI helpers) breaks a contract.
    (tmp_path / "router" / "policies.py").write_text(
        (tmp_path / "router" / "policies.py").read_text() + "\nfrom worker.config import build_config  # noqa\n")
    bad = _lint(tmp_path)
    assert bad.returncode != 0
    assert "The router loads nothing heavy and never the manager or the worker BROKEN" in bad.stdout, bad.stdout
