"""Lists of sites in messages, kept short: a count and the first few names.

Why: a message that names every site grows with the job. With a thousand sites a failure reason
listing them all is tens of kB, which gRPC refuses to carry in a status (its metadata limit is
16 KiB: RESOURCE_EXHAUSTED) and which buries the one line a person needs in the log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SHOWN = 5


def site_list(sites: Sequence[str], shown: int = SHOWN) -> str:
    """``a, b, c and 997 more``."""
    more = len(sites) - shown
    return ", ".join(sites[:shown]) + (f" and {more} more" if more > 0 else "")


def failure_list(failed: Mapping[str, str], shown: int = SHOWN) -> str:
    """``site-1: why; site-2: why (and 40 more sites failed)``; each reason's first line only."""
    items = list(failed.items())
    text = "; ".join(f"{site}: {first_line(why)}" for site, why in items[:shown])
    more = len(items) - shown
    return text + (f" (and {more} more site{'s' if more > 1 else ''} failed)" if more > 0 else "")


def first_line(text: str | None) -> str:
    """The first line of a reason (a traceback's summary), or "unknown reason"."""
    return (text or "").strip().splitlines()[0] if text and text.strip() else "unknown reason"
