"""The layering, read from the source: which module may import which.

Three rules (DESIGN.md, "The shape of the system"; issue 19):

1. The math modules (``MATH_MODULES``) import only torch, a few stdlib modules and each other: a loss
   that imports a trainer, a config or a tokenizer is in the wrong place.
2. ``data/``, ``models/`` and ``judges/`` never import the upper floor: ``recipes/``, ``pipeline``,
   ``cli`` or ``commands/``.
3. ``tasks/`` (the embedded default task) is imported by no foundation module: the task builds on
   the foundation, never the reverse. The foundation is everything except ``UPPER_FLOOR``.

Every import counts, including those inside functions (where a dependency is easiest to hide),
relative ones and ``importlib.import_module("rlhfkit....")`` with a literal name. The checker is a
plain function of (module name, source) so that a test can feed it a forbidden import and see it
flagged; the tree test then holds the real package to the same rules.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import rlhfkit

# Pure tensor math. A new pure module (e.g. ``rlhfkit.rewards``) joins this list; a name here with no
# file yet is simply not checked.
MATH_MODULES = ("rlhfkit.kl", "rlhfkit.advantages", "rlhfkit.losses", "rlhfkit.policy_losses",
                "rlhfkit.preference_losses", "rlhfkit.rewards", "rlhfkit.bias")
MATH_MAY_IMPORT = ("torch", "typing", "enum", "math", "dataclasses", "__future__")
# Packages below the upper floor that must not reach up to it (rule 2), and what "up" is.
LOWER_PACKAGES = ("rlhfkit.data", "rlhfkit.models", "rlhfkit.judges")
UPPER_FOR_LOWER = ("rlhfkit.recipes", "rlhfkit.pipeline", "rlhfkit.cli", "rlhfkit.commands")
# Everything that is not foundation (rule 3): the task itself and the floors that compose stages.
TASKS = "rlhfkit.tasks"
UPPER_FLOOR = (TASKS, "rlhfkit.recipes", "rlhfkit.pipeline", "rlhfkit.commands", "rlhfkit.cli", "rlhfkit.__main__")


def _under(name: str, prefixes) -> bool:
    """``name`` is one of ``prefixes`` or a submodule of one (``rlhfkit.recipes.ppo`` is under ``rlhfkit.recipes``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every module that ``source`` (the text of ``module``) imports, as (line, absolute dotted name).

    ``from a.b import c`` yields ``a.b.c``: ``c`` may be a submodule (``from rlhfkit import tasks``), and
    when it is a plain name, ``a.b.c`` still lies under whatever ``a.b`` lies under. A relative import
    is resolved against ``module``'s package (its own name when ``is_package``).
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found += [(node.lineno, base if a.name == "*" else f"{base}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            found.append((node.lineno, node.args[0].value))
    return found


def layering_violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` (whose text is ``source``) that break a rule: one message per line and rule."""
    rules = [
        (module in MATH_MODULES, lambda n: not (_under(n, MATH_MAY_IMPORT) or _under(n, MATH_MODULES)),
         f"a math module imports only torch, {', '.join(MATH_MAY_IMPORT[1:])} and other math modules"),
        (_under(module, LOWER_PACKAGES), lambda n: _under(n, UPPER_FOR_LOWER),
         "data/, models/ and judges/ never import recipes/, pipeline, cli or commands/"),
        (not _under(module, UPPER_FLOOR), lambda n: _under(n, (TASKS,)),
         "the foundation never imports tasks/ (the task imports the foundation)"),
    ]
    bad: dict[tuple[int, str], str] = {}
    for line, name in imported_modules(module, source, is_package):
        for applies, forbidden, rule in rules:
            if applies and forbidden(name):
                bad.setdefault((line, rule), f"{module}:{line} imports {name}: {rule}")
    return list(bad.values())


def _package_modules() -> list[tuple[str, Path, bool]]:
    """(dotted name, file, is a package) for every module under src/rlhfkit."""
    root = Path(rlhfkit.__file__).parent
    mods = [("rlhfkit", root / "__init__.py", True)]
    for info in pkgutil.walk_packages(rlhfkit.__path__, "rlhfkit."):
        rel = Path(*info.name.split(".")[1:])
        path = root / rel / "__init__.py" if info.ispkg else (root / rel).with_suffix(".py")
        mods.append((info.name, path, info.ispkg))
    return mods


# ---------------------------------------------------------------- the checker flags what it should

@pytest.mark.parametrize("module, source, rule", [
    ("rlhfkit.losses", "import torch\nfrom rlhfkit.training import fit\n", "math module"),
    ("rlhfkit.kl", "import numpy as np\n", "math module"),
    ("rlhfkit.advantages", "def f():\n    from transformers import AutoTokenizer\n", "math module"),
    ("rlhfkit.rewards", "from rlhfkit.config import load_config\n", "math module"),
    ("rlhfkit.data.collate", "from rlhfkit.recipes.sft import SFTConfig\n", "never import recipes"),
    ("rlhfkit.models.reward", "def f():\n    import rlhfkit.pipeline\n", "never import recipes"),
    ("rlhfkit.judges.spec", "from ..commands import stage\n", "never import recipes"),
    ("rlhfkit.judges", "from .. import cli\n", "never import recipes"),
    ("rlhfkit.data.steps", "import importlib\nm = importlib.import_module('rlhfkit.recipes.ppo')\n", "never import recipes"),
    ("rlhfkit.data.preferences", "def lines(t):\n    from rlhfkit.tasks.arith_judge import response_lines\n", "never imports tasks"),
    ("rlhfkit.report", "from rlhfkit import tasks\n", "never imports tasks"),
    ("rlhfkit.models.reward", "from ..tasks.arith import Problem\n", "never imports tasks"),
    ("rlhfkit.training", "from .tasks import arith\n", "never imports tasks"),
])
def test_a_forbidden_import_is_flagged(module, source, rule):
    bad = layering_violations(module, source, is_package=module == "rlhfkit.judges")
    assert bad and all(rule in b for b in bad), bad


@pytest.mark.parametrize("module, source", [
    ("rlhfkit.losses", "from __future__ import annotations\nfrom typing import Callable\nimport torch\n"
                       "import torch.nn.functional as F\nfrom enum import StrEnum\nimport math\n"),
    ("rlhfkit.advantages", "from rlhfkit.losses import masked_whiten\nfrom .kl import KLEstimator\nfrom rlhfkit import losses\n"),
    ("rlhfkit.data.preferences", "from rlhfkit.data.steps import step_lines\nfrom rlhfkit.io import read_jsonl_plain\n"),
    ("rlhfkit.judges.oracle", "from rlhfkit.judges.base import PreferenceFunction\nimport json\n"),
    ("rlhfkit.recipes.ppo", "from rlhfkit.tasks.arith_judge import judge\nfrom rlhfkit.recipes import sft\n"),
    ("rlhfkit.tasks.arith", "from rlhfkit.data.steps import step_lines\nfrom rlhfkit.losses import masked_mean\n"),
    ("rlhfkit.pipeline", "from rlhfkit.tasks import arith_data\n"),
    ("rlhfkit.commands.stage", "from ..tasks import arith\n"),
])
def test_an_allowed_import_is_not_flagged(module, source):
    assert layering_violations(module, source) == []


def test_relative_imports_resolve_against_the_package():
    assert ("rlhfkit.tasks.arith" in [n for _, n in imported_modules("rlhfkit.data.preferences", "from ..tasks import arith\n")])
    assert imported_modules("rlhfkit.judges", "from .oracle import X, Y\n", is_package=True) == \
        [(1, "rlhfkit.judges.oracle.X"), (1, "rlhfkit.judges.oracle.Y")]
    assert imported_modules("rlhfkit.judges.oracle", "\nfrom . import base\nfrom ..io import *\n") == \
        [(2, "rlhfkit.judges.base"), (3, "rlhfkit.io")]


# ---------------------------------------------------------------- the package itself

def test_every_module_imports_and_the_tree_keeps_its_layers():
    mods = _package_modules()
    names = {name for name, _, _ in mods}
    # The walk found the package (a wrong root would check nothing and pass).
    assert {"rlhfkit.losses", "rlhfkit.data.collate", "rlhfkit.recipes.ppo", "rlhfkit.tasks.arith"} <= names
    assert {m for m in MATH_MODULES if m != "rlhfkit.rewards"} <= names
    bad = []
    for name, path, is_pkg in mods:
        if name != "rlhfkit.__main__":  # importing it would run the CLI
            importlib.import_module(name)
        bad += layering_violations(name, path.read_text(), is_pkg)
    assert not bad, "layering broken:\n" + "\n".join(bad)
