"""Cross-site evaluation: every site scores every model; the matrix is NVFlare's JSON shape.

``cross_val_results.json`` is ``{evaluator_site: {model_name: {metric: value}}}``. Server
models are named ``SRV_`` + their file name (NVFlare's convention), site models by the site
that submitted them. A site's submitted model is written to disk while its answer is accepted (safetensors,
already checked), so the server holds one model at a time whatever the number of sites.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flkit.server.persistor import save_params, write_json

if TYPE_CHECKING:
    from flkit.server.controller import Answer

log = logging.getLogger("flkit.server")

RESULTS_DIR = "cross_site_val"
RESULTS_FILE = "cross_val_results.json"
SERVER_MODEL_PREFIX = "SRV_"


class CrossSiteEvaluation:
    """Collects the matrix for ``sites`` and writes it under ``<server dir>/cross_site_val/``."""

    def __init__(self, server_dir: Path, sites: list[str]) -> None:
        self.directory = Path(server_dir) / RESULTS_DIR
        self.sites = list(sites)
        self.results: dict[str, dict[str, dict[str, float]]] = {site: {} for site in sites}
        self.errors: dict[str, dict[str, str]] = {}
        self._site_models: dict[str, Path] = {}

    @property
    def path(self) -> Path:
        return self.directory / RESULTS_FILE

    def store_site_model(self, answer: Answer) -> None:
        """A ``submit_model`` answer, before it is accepted: write the site's model to disk (outside
        the server's lock). A server that cannot write notes it; the site is not blamed."""
        if answer.params is None:
            return
        path = self.directory / "models" / f"{answer.site}.safetensors"
        try:
            save_params(path, answer.params)
        except OSError as exc:
            log.error("cross-site evaluation: cannot save the model of site %s: %s", answer.site, exc)
            answer.problem = f"the server could not save it: {exc}"
            return
        answer.saved_to = path

    def add_site_model(self, answer: Answer) -> None:
        """A ``submit_model`` answer, accepted: the site's model is scored by every site."""
        if answer.saved_to is None:
            why = answer.problem or "answered without params"
            log.warning("cross-site evaluation: site %s's model is not scored: %s", answer.site, why)
            self.errors.setdefault(answer.site, {})["submit_model"] = why
            return
        self._site_models[answer.site] = answer.saved_to

    def site_models(self) -> list[tuple[str, Path]]:
        return [(site, self._site_models[site]) for site in self.sites if site in self._site_models]

    def scorer(self, model_name: str) -> Callable[[Answer], None]:
        def record(answer: Answer) -> None:
            self.results.setdefault(answer.site, {})[model_name] = dict(answer.metrics)

        return record

    def note_failures(self, failed: dict[str, str], model_name: str = "submit_model") -> None:
        for site, why in failed.items():
            self.errors.setdefault(site, {})[model_name] = why

    def save(self) -> Path:
        write_json(self.path, self.results)
        if self.errors:
            write_json(self.directory / "errors.json", self.errors)
        return self.path

