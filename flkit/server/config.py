"""Workflow settings the server needs; loaded from a job folder's JSON config."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, NamedTuple

from flkit.errors import ConfigError
from flkit.model import ParamsType

# Site names become folder names (<workspace>/<site>) and appear in logs: keep them plain.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = ("server",)

TRACKING_TYPES = ("tensorboard", "mlflow", "wandb")

# The server's workflows: rounds of training (the default), or one evaluation of the job's model.
TRAIN_MODE = "train"
EVALUATE = "evaluate"
MODES = (TRAIN_MODE, EVALUATE)
DEFAULT_NUM_ROUNDS = 2
# Settings that only mean something when the job trains: an evaluate-only job that sets one to
# other than its default (WorkflowConfig's) is refused, never run as if it had not.
TRAINING_ONLY = ("final_validation", "clients_per_round", "fraction", "aggregation_weights", "stop_cond", "patience",
                 "cross_site_eval", "params_transfer_type", "server_memory_gc_rounds")


def _plain(value: Any) -> Any:
    """An enum's value (``ParamsType.FULL`` -> "FULL"), anything else as it is."""
    return getattr(value, "value", value)


def check_site_name(name: object) -> str:
    """``name`` if it is a usable site name (it never reaches outside its folder), else ConfigError.

    The message quotes at most a short prefix of a bad name (it may come from the network)."""
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name) or name in RESERVED_NAMES or ".." in name:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 70 else \
            f"{name[:40]!r}... ({len(name)} characters)"
        raise ConfigError(
            f"site name {shown[:120]} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit, without '..' (and not {', '.join(RESERVED_NAMES)})"
        )
    return name


@dataclass
class CrossSiteEvalConfig:
    """After training, every site scores every model (NVFlare's CrossSiteModelEval).

    ``submit_model``: first ask each site for its local model (task ``submit_model``) and
    have it scored too; False scores only the server's models (the final and the best
    global model), like NVFlare's ``add_final_global_evaluation``.
    """

    submit_model: bool = True
    participating_clients: list[str] | None = None
    submit_model_timeout_s: float = 600.0
    validation_timeout_s: float = 6000.0

    def __post_init__(self) -> None:
        if self.participating_clients is not None:
            self.participating_clients = [check_site_name(s) for s in self.participating_clients]
        for name in ("submit_model_timeout_s", "validation_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"cross-site evaluation {name} must be a positive number of seconds, got {value!r}")


_STOP_COND = re.compile(r"^(\S+) (>=|<=|>|<|=) (\S+)$")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "=": operator.eq,
}


class StopCond(NamedTuple):
    """NVFlare's early-stopping condition ``"<metric> <op> <value>"``, parsed."""

    metric: str
    op: str
    value: float

    def holds(self, measured: float) -> bool:
        return _COMPARE[self.op](measured, self.value)


def parse_stop_cond(stop_cond: str | None) -> StopCond | None:
    """``"accuracy >= 0.95"`` (single spaces; >=, <=, >, < or =), parsed; ConfigError when malformed."""
    if stop_cond is None:
        return None
    match = _STOP_COND.match(stop_cond) if isinstance(stop_cond, str) else None
    if match is None:
        raise ConfigError(f"stop_cond must look like 'accuracy >= 0.95' (metric, operator, number), got {stop_cond!r}")
    try:
        value = float(match.group(3))
    except ValueError:
        raise ConfigError(f"stop_cond {stop_cond!r}: {match.group(3)!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"stop_cond {stop_cond!r}: the value must be a finite number")
    return StopCond(match.group(1), match.group(2), value)


@dataclass
class WorkflowConfig:
    """FedAvg round loop settings (NVFlare's names where they exist).

    Timeouts are in seconds; ``None`` means no limit (a lapsed heartbeat still ends a dead site).
    """

    # "train": rounds of training (FedAvg or the job's strategy). "evaluate": an evaluate-only run
    # (NVFlare's FedEvalRecipe): the job's model goes to every site once as a validate task, each
    # site's metrics are collected, and nothing is trained, aggregated or changed; sites that fail
    # or time out (round_timeout_s) are reported in server/evaluation.json, and the job fails only
    # when none answered. min_clients is then the number of sites needed to start.
    mode: str = TRAIN_MODE
    num_rounds: int = DEFAULT_NUM_ROUNDS
    # The fewest answers a round needs (FedAvgJob's min_clients); failures below it fail the job.
    min_clients: int = 1
    # Metric the sites report for the model they received; None: no best-model selection.
    key_metric: str | None = "accuracy"
    # True: lower is better (a loss); the job API's key_metric_mode="min".
    negate_key_metric: bool = False
    params_transfer_type: str = "FULL"
    # After the last round, send the final global model to the sites as a validate task so it
    # is scored (and can win best-model selection) like every other. NVFlare's FedAvg sends no
    # such task, so it is off unless asked for.
    final_validation: bool = False
    # Sites offered each round (a seeded random sample); None: every site (or ``fraction`` of them).
    clients_per_round: int | None = None
    # The share of the joined sites offered each round (0 < fraction <= 1; at least min_clients).
    fraction: float | None = None
    # Seed of the per-round sample (the same job samples the same sites).
    seed: int = 0
    # Sites that must join and answer every round; the job fails without them.
    mandatory_clients: list[str] = field(default_factory=list)
    # Per-site factor on the FedAvg weight (NUM_STEPS_CURRENT_ROUND); 1.0 for sites not listed.
    aggregation_weights: dict[str, float] = field(default_factory=dict)
    # Number of the first round (NVFlare's FedAvg start_round): rounds are start_round..start_round+num_rounds-1.
    start_round: int = 0
    # Run the garbage collector on the server after every N-th round (0: never).
    server_memory_gc_rounds: int = 0
    cross_site_eval: CrossSiteEvalConfig | None = None
    # Experiment tracking receivers on the server: [{"type": "tensorboard"|"mlflow"|"wandb", "config": {...}}].
    tracking: list[dict[str, Any]] = field(default_factory=list)
    # Receivers each site runs itself, writing into its own folder; an entry may name its
    # "clients" (default: every site).
    client_tracking: list[dict[str, Any]] = field(default_factory=list)
    # How long to wait for the expected sites to join before starting with min_clients.
    join_timeout_s: float = 300.0
    # Longest a round may take; sites that have not answered by then are dropped.
    round_timeout_s: float | None = None
    # Early stopping (NVFlare's FedAvg): stop after the first training round whose metric (the mean
    # over the sites that reported it) meets "<metric> <op> <value>", e.g. "accuracy >= 0.95" ...
    stop_cond: str | None = None
    # ... or after this many training rounds in a row without a new best key_metric (without a
    # key_metric: without improvement of stop_cond's metric, in the direction its operator says).
    patience: int | None = None
    heartbeat_interval_s: float = 5.0
    # A site not heard from for this long is considered dead.
    heartbeat_timeout_s: float = 60.0
    # A pre-flight check (``flkit check``; sites see it as ``flare.is_dry_run()``): every train
    # result is examined and all its problems listed (``Controller.checks``, metrics.json's
    # "checks") instead of refused at the first one; results are taken, never aggregated, and no
    # model is kept.
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"workflow mode must be one of {list(MODES)}, got {self.mode!r:.100}")
        if self.mode == EVALUATE:
            self._check_evaluate_only()
        if not isinstance(self.num_rounds, int) or self.num_rounds < 1:
            raise ConfigError(f"num_rounds must be >= 1, got {self.num_rounds!r}")
        if not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {self.min_clients!r}")
        if not isinstance(self.start_round, int) or self.start_round < 0:
            raise ConfigError(f"start_round must be >= 0, got {self.start_round!r}")
        if self.clients_per_round is not None:
            if not isinstance(self.clients_per_round, int) or self.clients_per_round < 1:
                raise ConfigError(f"clients_per_round must be >= 1, got {self.clients_per_round!r}")
            if self.fraction is not None:
                raise ConfigError("give clients_per_round (a count) or fraction (a share of the sites), not both")
            if self.clients_per_round < self.min_clients:
                raise ConfigError(f"clients_per_round={self.clients_per_round} is less than min_clients="
                                  f"{self.min_clients}: a round could never get enough answers")
        if self.fraction is not None and (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
                                          or not 0 < self.fraction <= 1):
            raise ConfigError(f"fraction must be a number in (0, 1], got {self.fraction!r}")
        try:
            self.params_transfer_type = ParamsType(getattr(self.params_transfer_type, "value",
                                                           self.params_transfer_type)).value
        except ValueError:
            raise ConfigError(
                f"params_transfer_type must be FULL or DIFF, got {self.params_transfer_type!r}"
            ) from None
        if self.key_metric is not None and (not isinstance(self.key_metric, str) or not self.key_metric):
            raise ConfigError("key_metric must be a non-empty metric name, or None for no best-model selection")
        parse_stop_cond(self.stop_cond)
        if self.patience is not None:
            if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
                raise ConfigError(f"patience must be an int >= 1 (rounds without improvement), got {self.patience!r}")
            if self.key_metric is None and self.stop_cond is None:
                raise ConfigError("patience counts rounds without improvement of the key_metric (or of stop_cond's "
                                  "metric): it needs a key_metric or a stop_cond")
        self.mandatory_clients = [check_site_name(s) for s in self.mandatory_clients]
        weights = {}
        for site, weight in dict(self.aggregation_weights).items():
            check_site_name(site)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight <= 0:
                raise ConfigError(f"aggregation_weights[{site!r}] must be a positive number, got {weight!r}")
            weights[site] = float(weight)
        self.aggregation_weights = weights
        if isinstance(self.cross_site_eval, dict):
            try:
                self.cross_site_eval = CrossSiteEvalConfig(**self.cross_site_eval)
            except TypeError as exc:
                raise ConfigError(f"cross_site_eval: {exc}") from None
        self.tracking = [_check_tracking(spec) for spec in self.tracking]
        self.client_tracking = [_check_tracking(spec, allow_clients=True) for spec in self.client_tracking]
        if isinstance(self.heartbeat_interval_s, bool) or not isinstance(self.heartbeat_interval_s, (int, float)) \
                or not self.heartbeat_interval_s > 0:
            raise ConfigError(f"heartbeat_interval_s must be a positive number of seconds, got "
                              f"{self.heartbeat_interval_s!r}")
        if not isinstance(self.dry_run, bool):
            raise ConfigError(f"dry_run must be true or false, got {self.dry_run!r}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError("heartbeat_timeout_s must be larger than heartbeat_interval_s")

    def _check_evaluate_only(self) -> None:
        """An evaluate-only job has one task and no training: settings of training are refused."""
        # num_rounds: 1, or the default (taken as not given; job.json's explicit values are checked
        # in from_dict).
        if self.num_rounds not in (1, DEFAULT_NUM_ROUNDS):
            raise ConfigError(f"workflow mode 'evaluate' runs one evaluation, no rounds of training: num_rounds="
                              f"{self.num_rounds!r} does not apply (leave it out, or 1)")
        self.num_rounds = 1
        defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                    for f in fields(self) if f.name in TRAINING_ONLY}
        given = [name for name in TRAINING_ONLY
                 if _plain(getattr(self, name)) != _plain(defaults[name])]
        if given:
            raise ConfigError(f"workflow mode 'evaluate' trains nothing: {', '.join(given)} "
                              f"{'does' if len(given) == 1 else 'do'} not apply (leave "
                              f"{'it' if len(given) == 1 else 'them'} out)")

    @property
    def last_round(self) -> int:
        return self.start_round + self.num_rounds - 1

    def client_tracking_for(self, site: str) -> list[dict[str, Any]]:
        """The receivers ``site`` runs itself (as the site's join reply carries them)."""
        return [{"type": s["type"], "config": s["config"]} for s in self.client_tracking
                if s.get("clients") is None or site in s["clients"]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkflowConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown workflow settings: {sorted(unknown)} (known: {sorted(known)})")
        if data.get("mode") == EVALUATE and data.get("num_rounds", 1) != 1:
            raise ConfigError(f"workflow mode 'evaluate' runs one evaluation, no rounds of training: num_rounds="
                              f"{data['num_rounds']!r} does not apply (leave it out, or 1)")
        return cls(**data)


def _check_tracking(spec: Any, allow_clients: bool = False) -> dict[str, Any]:
    if not isinstance(spec, dict) or spec.get("type") not in TRACKING_TYPES:
        raise ConfigError(f"tracking entries must be {{'type': one of {TRACKING_TYPES}, 'config': {{...}}}}, "
                          f"got {spec!r}")
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError(f"tracking config of {spec['type']} must be a dict, got {type(config).__name__}")
    unknown = set(spec) - {"type", "config", *(("clients",) if allow_clients else ())}
    if unknown:
        raise ConfigError(f"tracking entry has unknown keys {sorted(unknown)}")
    out = {"type": spec["type"], "config": config}
    if allow_clients:
        clients = spec.get("clients")
        out["clients"] = None if clients is None else [check_site_name(c) for c in clients]
    return out
