"""The CLI root: --help lists every subcommand without importing any; a missing extra is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import subprocess_env
from trainkit.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for name in ("ckpt", "merge", "plan", "diagnose", "run"):
        assert name in out
    assert set(SUBCOMMANDS) == {"ckpt", "merge", "plan", "diagnose", "run", "goodput"}


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "trainkit", "--version"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("trainkit ")


def _run(args: list[str], stub_dir=None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = subprocess_env()
    if stub_dir is not None:  # stubs shadow the real packages
        env["PYTHONPATH"] = os.pathsep.join([str(stub_dir), env["PYTHONPATH"]])
    return subprocess.run([sys.executable, "-m", "trainkit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_root_help_imports_no_subcommand():
    code = ("import sys\nfrom trainkit.cli import SUBCOMMANDS, main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m, _ in SUBCOMMANDS.values() if m in sys.modules), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[] False"


@pytest.fixture()
def no_scipy(tmp_path):
    """A ``scipy`` that fails to import the way a missing one does."""
    pkg = tmp_path / "stubs" / "scipy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'scipy\'", name="scipy")\n')
    return tmp_path / "stubs"


def test_missing_optional_dependency_is_one_line_only_when_used(no_scipy):
    for args in (["--help"], ["merge", "--help"], ["diagnose", "--help"]):
        proc = _run(args, no_scipy)
        assert proc.returncode == 0, (args, proc.stderr)
    assert "plan" in _run(["--help"], no_scipy).stdout
    for args in (["plan", "--topology", "t.toml", "--job", "j.toml"], ["plan", "--help"]):
        proc = _run(args, no_scipy)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("trainkit plan: needs 'scipy'") and "pip install 'trainkit[traffic]'" in err


def test_missing_dependency_in_a_handler_names_its_extra(monkeypatch, capsys):
    import trainkit.merge.cli as merge_cli

    def handler(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    def register(subparsers):
        subparsers.add_parser("merge").set_defaults(func=handler)

    monkeypatch.setattr(merge_cli, "register", register)
    assert main(["merge"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'trainkit[plot]'" in err and "'matplotlib'" in err


def test_a_bug_inside_trainkit_is_not_reported_as_a_missing_dependency(monkeypatch):
    import trainkit.merge.cli as merge_cli

    def handler(args):
        raise ModuleNotFoundError("No module named 'trainkit.nope'", name="trainkit.nope")

    monkeypatch.setattr(merge_cli, "register", lambda sp: sp.add_parser("merge").set_defaults(func=handler))
    with pytest.raises(ModuleNotFoundError):
        main(["merge"])


def test_nothing_imports_the_cli():
    root = Path(__file__).resolve().parents[1] / "trainkit"
    importers = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
                 if p.name != "__main__.py" and p != root / "cli.py"
                 and ("trainkit.cli import" in p.read_text() or "import trainkit.cli" in p.read_text())]
    assert importers == []


_BLOCKER = """
import sys
BLOCKED = {"scipy", "highspy", "s3fs", "matplotlib"}
class _Absent:  # behaves as if the optional packages were not installed at all
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
from trainkit.cli import main
code = main(sys.argv[1:])
assert not BLOCKED & {m.split(".")[0] for m in sys.modules}
sys.exit(code)
"""


def test_base_install_without_optional_extras():
    """merge and ckpt work with scipy, highspy, s3fs and matplotlib absent; plan names its extra."""
    def run(*args):
        return subprocess.run([sys.executable, "-c", _BLOCKER, *args], env=subprocess_env(), capture_output=True,
                              text=True, timeout=120)

    for args in (["merge", "--help"], ["ckpt", "--help"], ["--help"]):
        proc = run(*args)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (args, proc.stderr)
    proc = run("plan", "--help")
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "pip install 'trainkit[traffic]'" in err and ("'scipy'" in err or "'highspy'" in err)
