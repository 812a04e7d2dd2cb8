"""What every job's ``__main__`` shares: logging set-up and turning a configuration error into exit code 2.

    if __name__ == "__main__":
        raise SystemExit(run(main))
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from jobs.config import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Root logging to stderr; ``LOG_LEVEL`` (default INFO) picks the level. Idempotent."""
    logging.basicConfig(level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(), format=LOG_FORMAT,
                        stream=sys.stderr)


def run(main: Callable[[list[str] | None], int | None]) -> int:
    """Run ``main(sys.argv[1:])``; a ``ConfigError`` prints its message (it names the setting) and exits 2."""
    setup_logging()
    try:
        return int(main(sys.argv[1:]) or 0)
    except ConfigError as e:
        logging.getLogger("config").error("%s", e)
        return 2
