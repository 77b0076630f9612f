"""The package's layout holds: the rules import torch only, and imports go one way (tools -> doors -> rules)."""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import ROOT

PACKAGE = ROOT / "lightning_dsd"

#: Every module of the rules, imported with Lightning and transformers made unimportable.
WITHOUT_FRAMEWORKS = """
import importlib, pkgutil, sys, types
PACKAGE = {package!r}
FRAMEWORKS = ("lightning", "lightning_fabric", "pytorch_lightning", "lightning_utilities", "transformers")
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FRAMEWORKS:
            raise ImportError(f"the rules imported {name}")
sys.meta_path.insert(0, Refuse())
package = types.ModuleType("lightning_dsd")  # the package without its __init__, which imports the doors
package.__path__ = [PACKAGE]
sys.modules["lightning_dsd"] = package
import lightning_dsd.rules as rules
for module in pkgutil.iter_modules(rules.__path__):
    importlib.import_module(f"lightning_dsd.rules.{module.name}")
print(sorted(name for name in sys.modules if name.startswith("lightning_dsd.")))
"""


def test_the_rules_import_no_lightning_and_no_transformers():
    code = WITHOUT_FRAMEWORKS.replace("{package!r}", repr(str(PACKAGE)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "lightning_dsd.rules.engine" in run.stdout and "lightning_dsd.doors" not in run.stdout


def _package_imports(source: str) -> set[str]:
    """The ``lightning_dsd`` modules a source imports (``from lightning_dsd.x import y`` and ``import ...``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_dsd"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lightning_dsd"))
    return found


def test_imports_go_from_the_tools_to_the_doors_to_the_rules():
    layers = {"rules": {"rules"}, "doors": {"rules", "doors"}, "tools": {"rules", "doors", "tools"}}
    wrong = []
    for layer, allowed in layers.items():
        for source in (PACKAGE / layer).rglob("*.py"):
            for module in _package_imports(source.read_text()):
                parts = module.split(".")
                if len(parts) < 2 or parts[1] not in allowed | {"version"}:  # `lightning_dsd` is the public face
                    wrong.append(f"{source.relative_to(ROOT)} imports {module}")
    assert not wrong, wrong
