"""Keep native libraries' log lines off the user's terminal unless debugging.

MediaPipe's C++ core (absl logging, TensorFlow Lite) writes 3-4 lines straight to file descriptor 2 when a graph
first runs ("Created TensorFlow Lite XNNPACK delegate", "All log messages before absl::InitializeLog()", "Feedback
manager requires a model with a single signature ..."). No environment variable of that build turns them off, so
:func:`quiet_native_logs` points descriptor 2 at a temporary file around the first call of a graph, then hands back
whatever else was written meanwhile. With ``MARLIN_DEBUG=1`` (or ``marlin --debug`` / ``-v``) nothing is hidden.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NATIVE_LOG_LINE", "debugging", "quiet_native_logs"]

# The line shapes of absl / glog ("W0000 00:00:1796556797.860204 22147 file.cc:114] ...") and of TFLite's own logger.
NATIVE_LOG_LINE = re.compile(
    r"^(?:[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\] .*"
    r"|INFO: Created TensorFlow Lite .*"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)\s*$"
)


def debugging() -> bool:
    """True when the user asked to see everything: ``MARLIN_DEBUG=1`` or the marlin logger at DEBUG."""
    return os.environ.get("MARLIN_DEBUG", "") not in ("", "0") or logging.getLogger("marlin").isEnabledFor(
        logging.DEBUG
    )


@contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Hide native log lines written to descriptor 2 inside the block; pass every other line through afterwards."""
    if debugging():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (a daemon) or a replaced sys.stderr without one
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = [line for line in tmp.read().decode(errors="replace").splitlines(True)
                    if not NATIVE_LOG_LINE.match(line)]  # fmt: skip
            if rest:
                sys.stderr.write("".join(rest))
                sys.stderr.flush()
