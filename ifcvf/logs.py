"""Structured logging through rich: which component, which message, why."""
from __future__ import annotations

import logging


def setup_logging(verbosity: int = 0) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=True)], force=True)
