# A client script in the shape of NVFlare main's hello-world/hello-pt/client.py (digits data).
import argparse

import nvflare.client as flare
import torch
from nvflare.client.tracking import SummaryWriter
from torch import nn
from torch.utils.data import DataLoader

from data import load
from model import SimpleNetwork


def evaluate(model, loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += labels.size(0)
    return correct / total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)

    flare.init()
    site_name = flare.system_info()["site_name"]
    trainset, testset = load(site_name, flare.system_info()["num_sites"])
    train_loader = DataLoader(trainset, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(testset, batch_size=100)
    summary_writer = SummaryWriter()
    model = SimpleNetwork()
    last_params = None

    while flare.is_running():
        input_model = flare.receive()
        print(f"site = {site_name}, current_round={input_model.current_round}")

        if flare.is_submit_model():
            if last_params is None:
                raise RuntimeError("submit_model before any training")
            flare.send(flare.FLModel(params=last_params))
            continue

        model.load_state_dict(input_model.params)
        accuracy = evaluate(model, test_loader)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
            continue

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        steps = 0
        for epoch in range(args.epochs):
            model.train()
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss = loss_fn(model(images), labels)
                loss.backward()
                optimizer.step()
                steps += 1
            summary_writer.add_scalar(tag="loss", scalar=loss.item(),
                                      global_step=input_model.current_round * args.epochs + epoch)
        last_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        flare.send(flare.FLModel(params=model.state_dict(), metrics={"accuracy": accuracy},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
