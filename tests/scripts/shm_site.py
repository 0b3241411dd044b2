"""A no-op site that reports which transport it used; --kill_site dies by SIGKILL in --kill_round
after it mapped the task and left half a result file in the shared-memory folder."""

import argparse
import json
import os
import signal
from pathlib import Path

import flkit as flare
from flkit.client.current import current_session

parser = argparse.ArgumentParser()
parser.add_argument("--kill_site", default="")
parser.add_argument("--kill_round", type=int, default=1)
args = parser.parse_args()

flare.init()
while flare.is_running():
    model = flare.receive()
    transport = current_session().transport
    folder = getattr(transport, "folder", None)
    Path("transport.json").write_text(json.dumps({"name": transport.name, "folder": str(folder) if folder else None}))
    if flare.get_site_name() == args.kill_site and model.current_round == args.kill_round:
        (folder / ".result-half-written.tmp").write_bytes(b"\0" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)
    params = {k: v + 1.0 for k, v in model.params.items()}
    flare.send(flare.FLModel(params=params, metrics={"accuracy": 0.5}))
