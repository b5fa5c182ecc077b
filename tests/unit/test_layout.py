"""The distribution's shape: uniquely named packages, no `operator` shadowing, light imports."""

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
