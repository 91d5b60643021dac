"""Errors a user can fix, and the wrapper that turns them into one line on stderr instead of a traceback."""

from __future__ import annotations

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


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run `main`; report a UserError or Ctrl-C as one line and a non-zero exit status."""
    try:
        main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
