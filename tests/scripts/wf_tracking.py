"""Logs through every NVFlare-named writer each round; bad values are tried once and must raise.

One more scalar is logged after the job ended. What each bad call raised goes to <site workspace>/refused.json
({"nan": "ValidationError: ..."}); a keyword flkit cannot honour is a warning ({"kwarg_warnings": [...]}).
"""
import json
import warnings
from pathlib import Path

import flkit as flare
from flkit.tracking import MLflowWriter, SummaryWriter, WandBWriter

flare.init()
tb, mlflow, wandb = SummaryWriter(), MLflowWriter(), WandBWriter()
site = flare.get_site_name()
offset = 10.0 * (int(site.rsplit("-", 1)[1]) - 1)  # site-1: 0, site-2: 10
refused = {}


def attempt(name, call):
    try:
        call()
    except Exception as exc:  # reported to the test
        refused[name] = f"{type(exc).__name__}: {exc}"
    else:
        refused[name] = None


while flare.is_running():
    model = flare.receive()
    r = model.current_round
    tb.add_scalar("loss", offset + 1.0 / (r + 1), global_step=r)
    mlflow.log_metric("acc", offset + 0.5 + r / 4, step=r)
    mlflow.log_params({"lr": 0.1, "opt": "sgd"})
    mlflow.set_tag("stage", f"round-{r}")
    wandb.log({"f1": offset + 0.25 * (r + 1)}, step=r)
    flare.log("custom", offset + 2.0 * r, global_step=r)
    if r == 0:
        attempt("nan", lambda: tb.add_scalar("x", float("nan")))
        attempt("text", lambda: tb.add_scalar("x", "high"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tb.add_scalar("walltime_kw", offset, global_step=0, walltime=1234.5, new_style=True)
        refused["kwarg_warnings"] = [str(w.message) for w in caught]
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5}))
tb.add_scalar("after_job", offset + 7.0, global_step=9)  # logged after the last send: sent at the end
(Path(flare.get_config()["workspace"]) / "refused.json").write_text(json.dumps(refused))
