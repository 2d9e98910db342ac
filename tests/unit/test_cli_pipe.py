"""The real `tbml` writing into a pipe whose reader is gone (`tbml storage stats | head -1`): it exits
141 (128 + SIGPIPE, see cli/__init__.py) with nothing on stderr — no traceback, no "Exception ignored".

The pipe's read end is closed before the command starts, so its first write meets a closed reader
every time (in a shell pipeline that depends on whether `head` is still reading)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import EXIT_READER_GONE
from cli import main as cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pipe") / "data"
    assert cli(["data", "synth", "--pairs", "BTC", "--bars", "600", "--seed", "2", "--data-dir", str(d)]) == 0
    return d


def run_into_closed_pipe(args: list[str], data_dir: Path) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first byte is written
    try:
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, stdout=w, stderr=subprocess.PIPE, text=True, timeout=180,
                              env={**os.environ, "TBML_DATA_DIR": str(data_dir)})
    finally:
        os.close(w)


@pytest.mark.parametrize("args", [
    ["storage", "stats"],
    ["storage", "doctor"],
    ["features", "--pair", "BTC", "--json"],
    ["data", "synth", "--pairs", "ETH", "--bars", "300"],
    ["--help"],
], ids=lambda a: " ".join(a))
def test_a_closed_reader_ends_the_command_quietly(args: list[str], data_dir: Path):
    proc = run_into_closed_pipe(args, data_dir)
    assert proc.stderr == "", proc.stderr
    # argparse drops its own help text quietly when stdout fails (and exits 0); everything else is ours.
    assert proc.returncode == (0 if args == ["--help"] else EXIT_READER_GONE)


def test_a_real_shell_pipeline_into_head(data_dir: Path):
    proc = subprocess.run(["sh", "-c", f'"{sys.executable}" -m cli storage stats | head -1'],
                          cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TBML_DATA_DIR": str(data_dir)})
    assert proc.returncode == 0 and proc.stdout == "{\n", proc
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_a_broken_pipe_that_is_not_stdout_is_a_failure(data_dir: Path):
    """A BrokenPipeError of the command's own (a socket, a child's pipe) while stdout is fine is
    reported as a failure (exit 1, one line), not mistaken for a reader that went away."""
    code = ("import sys, cli.storage as s\n"
            "def broken(args): raise BrokenPipeError(32, 'Broken pipe (a socket of the command)')\n"
            "s.cmd_stats = broken\n"
            "from cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "storage", "stats"], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "TBML_DATA_DIR": str(data_dir)})
    assert proc.returncode == 1
    assert proc.stderr.startswith("tbml: failed: BrokenPipeError") and proc.stderr.count("\n") == 1
