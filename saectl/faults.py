"""Fault points: named places where a test can have the process kill itself with SIGKILL.

`SAECTL_FAULTS="harvest.group_written:3,store.before_complete"` kills the process the 3rd time
it reaches `harvest.group_written`, or the first time it reaches `store.before_complete`.
Unset (every real run), `point()` is one dictionary lookup. This is how the reliability tests
stop a real run at an exact moment (early, mid-chunk, during the complete marker) instead of
racing a timer; nothing is mocked.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def _armed() -> dict[str, int]:
    spec = os.environ.get("SAECTL_FAULTS", "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        out[name] = int(n or 1)
    return out


def point(name: str) -> None:
    if "SAECTL_FAULTS" not in os.environ:
        return
    at = _armed().get(name)
    if at is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == at:
        os.kill(os.getpid(), signal.SIGKILL)
