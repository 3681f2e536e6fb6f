"""Two processes writing one store at once (the norm cache's, the CLIP cache's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]


def write_at_once(script: str, target: Path, count: int, names: Sequence[str] = ("a", "b")) -> None:
    """Run ``script`` (argv: target, writer name, count) in one process per name, all at once;
    each must exit 0 without a word on stderr (a warning would mean a put missed the lock)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(target), name, str(count)], env=env, stderr=subprocess.PIPE, text=True)
        for name in names
    ]
    errors = [w.communicate(timeout=300)[1] for w in writers]
    assert [w.returncode for w in writers] == [0] * len(names), errors
    assert errors == [""] * len(names)
