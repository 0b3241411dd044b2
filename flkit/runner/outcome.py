"""How a site's run ended, and telling the server when it failed outside a Session."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flkit.client.settings import SiteSettings
from flkit.errors import FLKitError
from flkit.transport import make_transport

log = logging.getLogger("flkit.runner")


@dataclass
class SiteOutcome:
    site: str
    ok: bool
    error: str | None = None  # traceback or exit status when not ok


def report_site_failure(settings: SiteSettings, error: str, timeout_s: float = 5.0) -> None:
    """Fail the site's task on the server with ``error`` (best effort: a dead server is only logged).

    Used by runners that know more than the script could say itself: a script that never
    joined, an exit status with its stderr, an init timeout.
    """
    transport = make_transport(settings)
    try:
        transport.report_failure(settings.site_name, settings.job_id, settings.token, "", error, timeout=timeout_s)
    except FLKitError as exc:
        log.warning("site %s: could not report its failure to the server: %s", settings.site_name, exc)
    finally:
        transport.close()
