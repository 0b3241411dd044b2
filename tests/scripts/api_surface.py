"""Records what each Client API call answers during a job, into <workspace>/api.json."""
import json
import sys
from pathlib import Path

import flkit as flare

flare.init()
flare.init()  # a second init is harmless
seen = {"argv": sys.argv[1:], "config": flare.get_config(), "info": flare.system_info(),
        "job_id": flare.get_job_id(), "tasks": []}
while flare.is_running():
    model = flare.receive()
    assert flare.receive() is model or flare.receive().current_round == model.current_round  # same task again
    seen["tasks"].append([flare.get_task_name(), flare.is_train(), flare.is_evaluate(), flare.is_submit_model(),
                          model.current_round, model.total_rounds, model.params_type.value])
    flare.log("round", model.current_round)
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": 1.0}))
        continue
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5}))
assert flare.receive(timeout=1) is None  # after the end
Path(flare.get_config()["workspace"], "api.json").write_text(json.dumps(seen))
