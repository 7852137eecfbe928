"""The CLI root: --help lists every capability's subcommand and runs without torch work."""

from __future__ import annotations

import subprocess
import sys

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
    assert set(SUBCOMMANDS) == {"ckpt", "merge", "plan", "diagnose", "run"}


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "trainkit", "--version"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("trainkit ")
