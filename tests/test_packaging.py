"""setup.py installs what the package imports, and nothing it does not."""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from dfpipe.models.pretrained import LITE_PACKAGES
from dfpipe.stages import mtcnn_nets, onnx_model

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ["api", "pipeline", "models", "stages", "manifests"]


def _setup_call() -> ast.Call:
    tree = ast.parse((REPO / "setup.py").read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def declared() -> tuple[set[str], set[str]]:
    """(install_requires, every extra), as distribution names."""
    keywords = {k.arg: ast.literal_eval(k.value) for k in _setup_call().keywords
                if k.arg in ("install_requires", "extras_require")}
    return _names(keywords["install_requires"]), _names([r for rs in keywords["extras_require"].values() for r in rs])


def imported_modules() -> set[str]:
    """Top-level third-party modules the package imports, by statement or by name (the Lite weight packages,
    facenet-pytorch's weight files, onnx through torch.onnx)."""
    found = {module for module, _ in LITE_PACKAGES.values()} | {mtcnn_nets.PACKAGE, *onnx_model.MODULES}
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "dfpipe"}


def test_every_imported_module_is_declared_and_every_declared_one_imported():
    required, _ = declared()
    providers = packages_distributions()
    distributions = {}
    for module in imported_modules():
        names = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert names, f"{module}: imported by the package but installed by no distribution here"
        distributions[module] = names
    undeclared = sorted(m for m, names in distributions.items() if not names & required)
    assert not undeclared, f"imported but not in install_requires: {undeclared}"
    used = set().union(*distributions.values())
    assert sorted(required - used) == [], "declared in install_requires but never imported"


def test_optional_tensorboard_is_an_extra():
    _, extras = declared()
    assert "tensorboard" in extras
    assert "torch.utils.tensorboard" in (REPO / "stages/train.py").read_text()


def test_manifests_depend_on_nothing_above_them():
    """manifests/ owns every workspace write; the stages, models and commands build on it, never the reverse."""
    above = ("pipeline", "stages", "models", "api")
    for path in (REPO / "manifests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                target = ("dfpipe." if node.level == 2 else "") + (node.module or "")
                assert not (node.level == 2 or target.split(".")[:2] in [["dfpipe", a] for a in above]), \
                    f"{path.name} imports {'.' * node.level}{node.module}"
