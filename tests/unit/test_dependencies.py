"""Every third-party module the gateway imports at run time is a base dependency.

`./run serve` installs only `[project].dependencies`; a module that the
test extra happens to install would pass every test and then crash the
first start on a fresh machine (aiosmtplib did, found by a fresh-eyes run).
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
RUNTIME_PACKAGES = ("gateway", "ingest", "storage")


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for package in RUNTIME_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(RUNTIME_PACKAGES) - {"__future__"}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_runtime_imports_are_base_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = {_normalise(Requirement(spec).name) for spec in project["dependencies"]}
    distributions = packages_distributions()
    missing = {}
    for module in sorted(_imported_top_levels()):
        providers = {_normalise(d) for d in distributions.get(module, [])}
        assert providers, f"{module}: imported by the gateway but not installed at all"
        if not providers & base:
            missing[module] = sorted(providers)
    assert missing == {}, f"imported at run time but not in [project].dependencies: {missing}"
