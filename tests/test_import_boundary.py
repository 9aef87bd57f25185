"""The core package ``realsyn`` runs without Dagster: it imports nothing of the Dagster layer
(``assets``, ``resources``, ``sensors``, ``definitions``) nor Dagster itself."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import realsyn

FORBIDDEN = ("dagster", "assets", "resources", "sensors", "definitions")
PACKAGE_DIR = Path(realsyn.__file__).parent


def _forbidden(module: str) -> bool:
    top = module.split(".", 1)[0]
    return top in FORBIDDEN or top.startswith("dagster_")  # dagster_aws, dagster_k8s, ...


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_no_module_of_realsyn_imports_the_dagster_layer():
    offences = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            offences += [f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno} imports {m}" for m in modules if _forbidden(m)]
    assert not offences, "\n".join(offences)


def test_importing_every_module_of_realsyn_loads_no_dagster():
    names = _module_names()
    assert "realsyn.cli" in names and "realsyn.io" in names and "realsyn.runtime" in names
    script = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith('dagster_'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=PACKAGE_DIR.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
