"""What every target checks around a case: fds (and what else the case owns) come back."""
from __future__ import annotations

import logging
import os


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


class ErrorLog(logging.Handler):
    """Collects log records at ERROR and above: our code logs an unexpected
    exception at ERROR (a contained bug), so a case that logs one fails."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "ErrorLog":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)

    def unexpected(self) -> list[str]:
        out = []
        for r in self.records:
            text = r.getMessage()
            if "unexpected" in text or r.exc_info:
                tb = ""
                if r.exc_info:
                    import traceback
                    tb = "".join(traceback.format_exception(*r.exc_info))
                out.append(text + "\n" + tb)
        return out
