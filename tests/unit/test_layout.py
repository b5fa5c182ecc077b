"""The distribution's shape: uniquely named packages, no `operator` shadowing, light imports."""

import ast
import operator
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_packages_live_in_their_folders():
    import kubetune
    import kubetune_operator
    import kubetune_trainer

    assert Path(kubetune_operator.__file__).parent.parent == ROOT / "operator"
    assert Path(kubetune_trainer.__file__).parent.parent == ROOT / "trainer"
    assert Path(kubetune.__file__).parent.parent == ROOT


def test_stdlib_operator_module_is_not_shadowed():
    assert operator.__file__ and ROOT not in Path(operator.__file__).parents
    assert operator.add(2, 3) == 5


def test_cli_imports_neither_torch_nor_kopf():
    code = ("import sys, kubetune.cli, kubetune.devcluster.cluster; "
            "bad = [m for m in ('torch', 'kopf', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubetune_command_has_dev_cluster_subcommands():
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "dev-cluster", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    for action in ("up", "down", "env", "status", "build"):
        assert action in proc.stdout


def test_operator_imports_without_torch():
    code = ("import sys, kubetune_operator.main, kubetune_operator.controller, "
            "kubetune_operator.handlers.finetunejob; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_trainer_never_imports_kopf():
    code = ("import sys, kubetune_trainer.train, kubetune_trainer.local, kubetune_trainer.merge; "
            "sys.exit(1 if 'kopf' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports too), absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _modules(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
    assert files, folder
    return files


@pytest.mark.parametrize("folder, forbidden", [
    # The operator reaches storage, manifests and the trainer's config through `kubetune`:
    # its image copies no trainer code.
    ("operator/kubetune_operator", ("kubetune_trainer", "torch", "transformers", "peft", "trl")),
    ("trainer/kubetune_trainer", ("kopf", "kubetune_operator")),
    # The shared core is imported by both images: it may reach neither side.
    ("kubetune/api", ("kubetune_trainer", "kubetune_operator", "torch", "kopf")),
])
def test_no_module_imports_across_the_boundary(folder, forbidden):
    bad = [f"{path.relative_to(ROOT)} imports {name}"
           for path in _modules(ROOT / folder) for name in sorted(_imports(path))
           if name.split(".")[0] in forbidden]
    assert not bad, bad


def test_contract_modules_stand_alone():
    """What both sides share (storage, manifests, the trainer's config) imports neither side."""
    for name in ("storage", "artifacts", "safepath", "trainerconfig", "contract", "reasons"):
        path = ROOT / "kubetune" / f"{name}.py"
        assert path.exists(), path
        bad = [m for m in _imports(path)
               if m.split(".")[0] in ("kubetune_trainer", "kubetune_operator", "torch", "kopf")]
        assert not bad, f"{path.name}: {bad}"


def test_every_operator_module_imports_with_the_trainer_absent():
    """Import every operator module with `kubetune_trainer` made unimportable (as in the image)."""
    names = [".".join(p.relative_to(ROOT / "operator").with_suffix("").parts)
             for p in _modules(ROOT / "operator" / "kubetune_operator")]
    names = [n.removesuffix(".__init__") for n in names]
    code = ("import importlib, sys; sys.modules['kubetune_trainer'] = None; "
            f"[importlib.import_module(n) for n in {names!r}]; print(len({names!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == len(names) > 20


def test_the_operator_image_copies_no_trainer_code():
    stages, current = {}, None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            current = line.split()[-1]
            stages[current] = []
        elif current and line.startswith("COPY "):
            stages[current].append(line.split()[1])
    assert "operator" in stages["operator"] and "kubetune" in stages["operator"]
    assert "trainer" not in stages["operator"], stages["operator"]
    assert "operator" not in stages["trainer"], stages["trainer"]
