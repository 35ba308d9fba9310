"""Real git + DVC repositories in temporary folders, for the DVC tests (importable from any test).

    repo = init_repo(tmp_path / "repo")      # git init + dvc init, analytics off
    dvc(repo, "add", "data/quickstart.jsonl")
    git(repo, "commit", "-qam", "v1")
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

VENV_BIN = Path(sys.executable).parent
# No network here, and none wanted: DVC's usage analytics off.
ENV = {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def env(**extra: str) -> dict[str, str]:
    """The environment for git/dvc: `tunegraph` (a dvc.yaml command) found on PATH."""
    return {**os.environ, **ENV, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            **extra}


def run(cwd: Path, *command: str, timeout: int = 600, **extra_env: str) -> str:
    done = subprocess.run(list(command), cwd=cwd, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(command)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done.stdout


def dvc(cwd: Path, *args: str, timeout: int = 600, **extra_env: str) -> str:
    return run(cwd, sys.executable, "-m", "dvc", *args, timeout=timeout, **extra_env)


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", *args)


def init_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    dvc(path, "init", "-q")
    dvc(path, "config", "core.analytics", "false")
    return path


def dvc_file_md5(dvc_file: Path) -> str:
    """The md5 a `.dvc` file records for its one output."""
    (out,) = yaml.safe_load(dvc_file.read_text())["outs"]
    return out["md5"]
