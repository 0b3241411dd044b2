"""Train the tutorial CNN on CIFAR-10 (or the offline digits stand-in): plain PyTorch, no FL.

This is the starting point of the example. cifar10_fl.py is this same script turned into a
federated-learning client; `diff -w cifar10_original.py cifar10_fl.py` shows the few lines
that differ. The work is split into train() and evaluate() so that the FL version can call
them once per round without any change to them.

    python src/cifar10_original.py --dataset digits        # offline, ~10 s on a laptop CPU
    python src/cifar10_original.py                         # CIFAR-10, after ./prepare_data.sh
"""

from __future__ import annotations

import argparse

import torch
from data import DATASETS, DEFAULT_DATA_PATH, load_datasets, shard  # noqa: F401 (shard: used by the FL script)
from net import Net
from torch import nn, optim
from torch.utils.data import DataLoader


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=DATASETS, default="cifar10", help="training data (default: cifar10)")
    parser.add_argument("--data_path", default=DEFAULT_DATA_PATH, help="CIFAR-10 folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training set (default: 2)")
    parser.add_argument("--batch_size", type=int, default=16, help="mini-batch size (default: 16)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, momentum 0.9 (default: 0.01)")
    return parser.parse_args()


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float, device: str) -> int:
    """Train ``net`` in place for ``epochs`` epochs; return the number of optimizer steps taken.

    A fresh optimizer is made on every call: the FL script calls this once per round on the
    newly received global model, and momentum from the previous round's model would not fit it.
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
    """Fraction of ``loader``'s samples that ``net`` classifies correctly, in [0, 1]."""
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
    trainset, testset = load_datasets(args.dataset, args.data_path)
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
