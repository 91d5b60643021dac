"""Running the DVC command line from the library: the DVC installed beside this package, failures as UserError."""

from __future__ import annotations

import subprocess
import sys

from inatpipe.errors import UserError


def run_dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc <args>` in the current directory; with `check`, a failure is one line naming the command and DVC's error."""
    # `python -m dvc` with this interpreter: the DVC installed beside this package, whatever PATH says.
    result = subprocess.run([sys.executable, "-m", "dvc", *args], text=True, capture_output=True)
    if check and result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise UserError(f"`dvc {' '.join(args)}` failed: {last[0]}")
    return result
