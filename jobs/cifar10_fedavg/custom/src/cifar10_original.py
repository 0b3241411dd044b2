"""Train the tutorial CNN on CIFAR-10 (or on the offline digits stand-in).

cifar10_original.py is plain PyTorch; cifar10_fl.py is the same file turned into a
federated-learning client with flkit, and `diff -w` between the two shows every changed
line. train() and evaluate() are the same in both: the FL script calls them once per round.

    python src/cifar10_original.py --dataset digits     # plain training, offline
    python job.py --script_args "--dataset digits"      # FL: runs cifar10_fl.py on 2 sites
"""

from __future__ import annotations

import argparse

import torch
from torch import nn, optim
from torch.utils.data import DataLoader

import data
from net import Net


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=data.DATASETS, default="cifar10", help="training and test data")
    parser.add_argument("--data_path", default=data.DEFAULT_DATA_PATH, help="folder holding CIFAR-10")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of training (in FL: per round)")
    parser.add_argument("--batch_size", type=int, default=4, help="mini-batch size, as in the tutorial")
    parser.add_argument("--lr", type=float, default=0.003, help="learning rate of SGD with momentum 0.9")
    return parser.parse_args()


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float, device: str) -> int:
    """Train ``net`` in place for ``epochs`` epochs; return the number of optimizer steps taken.

    The FL script calls this once per round on the newly received global model, hence a fresh
    optimizer on every call (momentum from an older model would not fit the new one) and the
    move to ``device`` here (the FL script moves ``net`` to the CPU to send it). With epochs=0
    nothing is trained and 0 is returned.
    """
    net.to(device).train()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    steps = 0
    for epoch in range(epochs):
        running_loss = 0.0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            steps += 1
        print(f"epoch {epoch + 1}: mean loss {running_loss / max(len(loader), 1):.3f}")
    return steps


def evaluate(net: nn.Module, loader: DataLoader, device: str) -> float:
    """Fraction of ``loader``'s samples that ``net`` classifies correctly, in [0, 1].

    In the FL script this scores the model received from the server, before local training:
    that is the accuracy reported back (as NVFlare does), so the server learns how good its
    global model is on every site's test data.
    """
    net.to(device).eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in loader:
            predicted = net(inputs.to(device)).argmax(dim=1)
            correct += (predicted == labels.to(device)).sum().item()
            total += labels.size(0)
    return correct / max(total, 1)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainset, testset = data.load_datasets(args.dataset, args.data_path)
    trainloader = DataLoader(trainset, batch_size=args.batch_size, shuffle=True)
    testloader = DataLoader(testset, batch_size=256)
    net = Net()

    accuracy = evaluate(net, testloader, device)
    print(f"Accuracy before training: {100 * accuracy:.1f} %")
    steps = train(net, trainloader, args.epochs, args.lr, device)
    print(f"Finished training: {steps} steps")

    print(f"Accuracy of the network on the test images: {100 * evaluate(net, testloader, device):.1f} %")


if __name__ == "__main__":
    main()
