"""A site whose reported accuracy follows a schedule: ``--accuracies 0.5,0.7,0.9`` gives round r's
value (the last one after that), as if it scored the global model it received. It trains nothing:
it sends the model back unchanged, for the early-stopping tests."""

import argparse

import flkit as flare

parser = argparse.ArgumentParser()
parser.add_argument("--accuracies", required=True)
schedule = [float(v) for v in parser.parse_args().accuracies.split(",")]

flare.init()
while flare.is_running():
    model = flare.receive()
    accuracy = schedule[min(model.current_round, len(schedule) - 1)]
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": accuracy},
                             meta={"NUM_STEPS_CURRENT_ROUND": 1}))
