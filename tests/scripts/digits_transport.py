"""Trains SmallNet on this site's shard of digits each round and reports the transport it used."""
import json
from pathlib import Path

import flkit as flare
from flkit.client.current import current_session

from digits_task import SmallNet, accuracy, load, train

net = SmallNet()
flare.init()
site = flare.get_site_name()
train_x, train_y, test_x, test_y = load(shard=int(site.rsplit("-", 1)[1]) - 1, num_shards=2)
while flare.is_running():
    model = flare.receive()
    net.load_state_dict(model.params)
    score = accuracy(net, test_x, test_y)  # of the global model received (NVFlare's convention)
    steps = train(net, train_x, train_y, epochs=1, seed=model.current_round)
    transport = current_session().transport
    Path(flare.get_config()["workspace"], "transport.json").write_text(json.dumps(
        {"name": transport.name, "shm_active": bool(getattr(transport, "active", False))}))
    flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": score},
                             meta={"NUM_STEPS_CURRENT_ROUND": steps}))
