# The Client API script in the shape of NVFlare's ml-to-fl/pt/src/cifar10_fl.py (digits data).
import argparse

# (1) import nvflare client API
import nvflare.client as flare
import torch
import torch.nn as nn
import torch.optim as optim
from nvflare.client.tracking import SummaryWriter
from torch.utils.data import DataLoader

from data import load
from net import Net

DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"


def evaluate(net, loader):
    correct = total = 0
    net.eval()
    with torch.no_grad():
        for images, labels in loader:
            outputs = net(images.to(DEVICE))
            correct += (outputs.argmax(1) == labels.to(DEVICE)).sum().item()
            total += labels.size(0)
    return correct / total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)

    # (2) initializes NVFlare client API
    flare.init()
    site = flare.get_site_name()
    trainset, testset = load(site, flare.system_info().get("num_sites", 2))
    trainloader = DataLoader(trainset, batch_size=32, shuffle=True)
    testloader = DataLoader(testset, batch_size=100)
    summary_writer = SummaryWriter()
    net = Net()

    # (3) run continously when launch_once=true
    while flare.is_running():
        # (4) receive FLModel from NVFlare
        input_model = flare.receive()
        print(f"current_round={input_model.current_round}")

        # (5) loads model from NVFlare
        net.load_state_dict(input_model.params)
        net.to(DEVICE)
        criterion = nn.CrossEntropyLoss()
        optimizer = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

        # (6) evaluate the received global model (for server-side model selection)
        accuracy = evaluate(net, testloader)

        steps = args.epochs * len(trainloader)
        for epoch in range(args.epochs):
            net.train()
            running_loss = 0.0
            for inputs, labels in trainloader:
                optimizer.zero_grad()
                loss = criterion(net(inputs.to(DEVICE)), labels.to(DEVICE))
                loss.backward()
                optimizer.step()
                running_loss += loss.item()
            global_step = input_model.current_round * steps + (epoch + 1) * len(trainloader)
            summary_writer.add_scalar(tag="loss", scalar=running_loss / len(trainloader), global_step=global_step)

        # (7) construct trained FL model
        output_model = flare.FLModel(
            params=net.cpu().state_dict(),
            metrics={"accuracy": accuracy},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
        # (8) send model back to NVFlare
        flare.send(output_model)
        torch.save(net.state_dict(), "./cifar_net.pth")  # a relative path, as NVFlare's script writes


if __name__ == "__main__":
    main()
