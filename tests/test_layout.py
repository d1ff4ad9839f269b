"""The layout's rules, checked on the code: one-way imports, module size, one builder of a
device's plan, one place that ends a round, and how many files one default round runs through."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedpeat", "strategies", "server_app", "client_app")
CODE = (*PACKAGES, "bench")
MAX_LINES = 500


def _sources(packages: tuple[str, ...] = CODE) -> list[Path]:
    return sorted(p for pkg in packages for p in (PROJECT / pkg).rglob("*.py"))


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's contracts (pyproject.toml) on the packages under `root`."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())",
        ],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_import_contracts_hold() -> None:
    out = _lint_imports(PROJECT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


# One planted import per contract (pyproject.toml), each in a module of the side it binds.
PLANTED = {
    "Apps above strategies above the library": (
        "strategies/fleet.py",
        "import server_app.recorder",
    ),
    "The ClientApp uses the library alone": ("client_app/app.py", "import strategies.planning"),
    "Command-line tools use the library alone": ("fedpeat/cli/sweep.py", "import strategies.fleet"),
    "The library imports no command-line tool": ("fedpeat/lora.py", "import fedpeat.cli.launch"),
    "The library has no Flower import": ("fedpeat/cost.py", "import flwr.app"),
}


def test_every_contract_breaks_on_a_wrong_import(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(PROJECT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", tmp_path / "pyproject.toml")
    for module, bad_import in PLANTED.values():
        target = tmp_path / module
        target.write_text(target.read_text() + f"\n{bad_import}  # planted by the test\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout[-2000:]
    verdicts = [ln for ln in out.stdout.splitlines() if " KEPT" in ln or " BROKEN" in ln]
    for contract in PLANTED:
        assert any(v.startswith(contract) and " BROKEN" in v for v in verdicts), verdicts


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(p.relative_to(PROJECT)): n
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _calls(name: str, packages: tuple[str, ...] = PACKAGES) -> Counter[str]:
    """Files (relative) that call a function or class named `name`, with the count."""
    found: Counter[str] = Counter()
    for path in _sources(packages):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                if called == name:
                    found[str(path.relative_to(PROJECT))] += 1
    return found


def test_a_devices_plan_is_built_in_one_function() -> None:
    # `Plan(...)` is constructed only by strategies.planning.build_plan (protocol.py's own
    # from_json rebuilds one that arrived; it goes through from_dict, not the constructor).
    assert _calls("Plan") == Counter({"strategies/planning.py": 2})
    tree = ast.parse((PROJECT / "strategies/planning.py").read_text())
    builder = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_plan"
    )
    inside = sum(
        1
        for n in ast.walk(builder)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Plan"
    )
    assert inside == 2, "both Plan(...) calls must sit inside build_plan"


def test_level_choice_and_the_round_end_each_live_in_one_place() -> None:
    assert set(_calls("assign_levels")) == {"strategies/planning.py"}
    assert set(_calls("choose_levels")) == {"strategies/planning.py"}
    # The strategy's round end (controller feedback, stats) and the checkpoint are called
    # from the recorder alone, once a round.
    assert _calls("end_round") == Counter({"server_app/recorder.py": 1})
    assert _calls("save_checkpoint") == Counter({"server_app/recorder.py": 1})


def test_one_default_round_runs_through_few_files(
    tmp_path: Path, server_identity: None, device_disks: Path
) -> None:
    """Round 2 of a default round (the tiny experiment takes the default round's path: case 1,
    levels by memory, fedavg, server training) traced by `bench.round_files`: the files that
    direct it, and every file entered."""
    from bench.round_files import trace_round
    from fedpeat.config import compose

    overrides = "experiment=tiny rounds=2"
    cfg = compose(overrides)
    assert cfg.controller.name == "none" and not cfg.planner.enabled and not cfg.privacy.enabled
    traced = trace_round(overrides, 2, tmp_path)
    entered, directing = traced.entered, traced.directing
    assert "strategies/fedpeat_strategy.py" in entered and "client_app/app.py" in entered
    assert len(directing) <= 12, sorted(directing)
    # Every file entered, leaves included: 18 before the layout was redrawn, and no more now.
    assert len(entered) <= 18, sorted(entered)
