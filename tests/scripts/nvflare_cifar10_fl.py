# A training script written for NVFlare's Client API, in the shape of NVFlare's
# ml-to-fl `cifar10_fl.py` (init; while is_running; receive; load_state_dict; evaluate
# the received model; train; send FLModel with metrics and NUM_STEPS; SummaryWriter).
# The test replaces only the two nvflare import lines with flkit's.
import argparse

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter

from digits_task import SmallNet, accuracy, load, train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    net = SmallNet()
    flare.init()
    site = flare.get_site_name()
    info = flare.system_info()
    shard = int(site.split("-")[-1]) - 1
    train_x, train_y, test_x, test_y = load(shard, info["num_sites"])
    summary_writer = SummaryWriter()

    while flare.is_running():
        input_model = flare.receive()
        print(f"site={site} current_round={input_model.current_round}")
        net.load_state_dict(input_model.params)

        acc = accuracy(net, test_x, test_y)  # the received global model
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": acc}))
            continue

        def log_loss(loss, step, round_=input_model.current_round):
            summary_writer.add_scalar(tag="loss", scalar=loss, global_step=round_ * 1000 + step)

        steps = train(net, train_x, train_y, epochs=args.epochs, seed=input_model.current_round, on_loss=log_loss)
        output_model = flare.FLModel(
            params=net.cpu().state_dict(),
            metrics={"accuracy": acc},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
        flare.send(output_model)


if __name__ == "__main__":
    main()
