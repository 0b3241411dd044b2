"""One site, seeded local training per round: used to show FL == local training, bit for bit."""
import flkit as flare

from digits_task import SmallNet, load, train

net = SmallNet()
flare.init()
train_x, train_y, _, _ = load()
while flare.is_running():
    model = flare.receive()
    net.load_state_dict(model.params)
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={}))
        continue
    steps = train(net, train_x, train_y, epochs=1, seed=123)
    flare.send(flare.FLModel(params=net.state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": steps}))
