"""Errors that emotune reports to users as one readable paragraph instead of a traceback.

Every error raised on purpose derives from :class:`EmotuneError`; the command-line entry points catch it,
print its message and exit with status 2. :class:`DataError` is the one for bad input: it carries the file,
the CSV row and the utterance id so that the message always says where the problem is and how to fix it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


class EmotuneError(Exception):
    """An error whose message is written for the user: what is wrong and how to fix it."""


class DataError(EmotuneError):
    """Bad input data: a row, an audio file or a whole CSV that cannot be used.

    ``row`` is the 1-based line number in the CSV file as a text editor shows it (the header is line 1);
    ``kind`` is a short category ("missing audio", "unknown label", ...) used to count skipped rows.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        row: int | None = None,
        utt_id: str | None = None,
        fix: str | None = None,
        kind: str | None = None,
    ) -> None:
        self.problem = problem
        self.kind = kind or "bad input"
        self.file = str(file) if file is not None else None
        self.row = row
        self.utt_id = utt_id
        self.fix = fix
        super().__init__(self._compose())

    @property
    def where(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.utt_id is not None:
            parts.append(f"id '{self.utt_id}'")
        return ", ".join(parts)

    def _compose(self) -> str:
        message = f"{self.where}: {self.problem}" if self.where else self.problem
        if self.fix:
            message = f"{message.rstrip('.')}. {self.fix}"
        return message


def run_command(action: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a command-line action: an :class:`EmotuneError` becomes its message on stderr and exit status 2."""
    try:
        return int(action() or 0)
    except EmotuneError as exc:
        print(f"emotune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"emotune: {interrupted}", file=sys.stderr)
        return 130
