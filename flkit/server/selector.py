"""Best-model selection by a key metric that sites report for the global model they received."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flkit.server.validation import missing_key_metric

log = logging.getLogger("flkit.server")


@dataclass
class Score:
    round: int
    value: float
    sites: int


class BestModelSelector:
    """Keeps the best round's score; higher is better unless ``negate`` (for losses).

    A round's score is the mean of ``key_metric`` over the sites that reported it.
    Sites report metrics of the model they *received*, so round r's score belongs
    to the global model that was sent out in round r. ``key_metric=None`` selects nothing
    (NVFlare's ``key_metric=None``: no model selector).
    """

    def __init__(self, key_metric: str | None, negate: bool = False) -> None:
        self.key_metric = key_metric
        self.negate = negate
        self.best: Score | None = None
        self._warned: set[str] = set()

    def round_score(self, round_num: int, metrics_by_site: dict[str, dict[str, float]]) -> Score | None:
        """The round's score, or None when no site reported the key metric (warned once per site)."""
        if self.key_metric is None:
            return None
        values = []
        for site, metrics in metrics_by_site.items():
            if self.key_metric in metrics:
                values.append(float(metrics[self.key_metric]))
            elif site not in self._warned:
                self._warned.add(site)
                log.warning("%s", missing_key_metric(site, self.key_metric, metrics))
        if not values:
            return None
        return Score(round=round_num, value=sum(values) / len(values), sites=len(values))

    def offer(self, score: Score | None) -> bool:
        """Record ``score``; True when it beats every earlier round."""
        if score is None:
            return False
        better = (
            self.best is None
            or (score.value < self.best.value if self.negate else score.value > self.best.value)
        )
        if better:
            self.best = score
        return better
