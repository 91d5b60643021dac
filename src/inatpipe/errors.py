"""Errors a user can fix, and the wrapper that turns them into one line on stderr instead of a traceback."""

from __future__ import annotations

import atexit
import functools
import gc
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input or missing files: the message names the problem and how to fix it."""


class ConfigError(UserError):
    """A params.yaml key is unknown, missing, mistyped or out of range."""


def one_line(error: UserError) -> str:
    text = str(error).strip()
    # A DataLoader worker's error comes back wrapped with the worker's traceback; its last line is the message.
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


@functools.cache  # once per process
def _freeze_at_exit() -> None:
    atexit.register(gc.freeze)


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run `main`; report a UserError or Ctrl-C as one line and a non-zero exit status.

    Also makes the process's exit quick: at exit, before Python's last garbage collections, every object still
    alive is frozen (`gc.freeze`), so those passes skip the hundreds of thousands of objects torch's modules hold.
    That saves a second or two per stage process; the memory goes back to the system with the process anyway."""
    _freeze_at_exit()
    if not gc.isenabled():  # a stage process after its imports (inatpipe.startup turned collection off for them)
        gc.freeze()
        gc.enable()
    try:
        main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
