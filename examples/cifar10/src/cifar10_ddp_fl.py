"""Train the tutorial CNN on CIFAR-10 (or on the offline digits stand-in) with DDP, one process per GPU.

cifar10_ddp_original.py is plain PyTorch DistributedDataParallel; cifar10_ddp_fl.py is the same
file turned into a federated-learning client with flkit, and `diff -w` between the two shows
every changed line. train() and evaluate() are the same in both: the FL script calls them once
per round. Every rank runs the script; rank 0 alone evaluates, prints accuracies and (in FL)
sends the site's result. Without a GPU the ranks train on the CPU over gloo.

    python3 -m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_port=29500 \\
        src/cifar10_ddp_original.py --dataset digits              # plain DDP training, offline
    python job.py --script src/cifar10_ddp_fl.py --launch_process \\
        --launch_command 'python3 -m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_port={PORT}' \\
        --ports 7777,8888 --script_args "--dataset digits"        # FL: 2 sites, 2 ranks each
"""

from __future__ import annotations

import argparse
import os

import flkit as flare
import torch
import torch.distributed as dist
from torch import nn, optim
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import data
from net import Net


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=data.DATASETS, default="cifar10", help="training and test data")
    parser.add_argument("--data_path", default=data.DEFAULT_DATA_PATH, help="folder holding CIFAR-10")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of training (in FL: per round)")
    parser.add_argument("--batch_size", type=int, default=4, help="batch size per rank, as in the tutorial")
    parser.add_argument("--lr", type=float, default=0.003, help="learning rate of SGD with momentum 0.9")
    return parser.parse_args()


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float, device: str) -> int:
    """Train ``net`` (the DDP wrapper) in place for ``epochs`` epochs; return this rank's optimizer steps.

    Every rank calls this at the same time: DDP averages the gradients over the ranks in each
    backward pass, so all ranks take the same steps and keep identical weights. The FL script
    calls this once per round on the newly received global model, hence a fresh optimizer on
    every call (momentum from an older model would not fit the new one). ``net`` already lives
    on ``device`` (DDP needs it there from the start, so the FL script sends a CPU copy of the
    weights rather than moving the model); ``.to(device)`` is kept as a harmless no-op. With
    epochs=0 nothing is trained and 0 is returned.
    """
    net.to(device).train()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sampler = loader.sampler
    steps = 0
    for epoch in range(epochs):
        # DistributedSampler reshuffles only when given a new epoch number, which must be the same
        # on all ranks so that their shares stay disjoint. Counting on from the sampler's own
        # epoch (not from this call's `epoch`) gives every FL round new shuffles too.
        sampler.set_epoch(sampler.epoch + 1)
        running_loss = 0.0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()  # DDP all-reduces (averages) the gradients across ranks here
            optimizer.step()
            running_loss += loss.item()
            steps += 1
        if dist.get_rank() == 0:
            print(f"epoch {epoch + 1}: mean loss {running_loss / max(len(loader), 1):.3f} (rank 0's share)")
    return steps


def evaluate(net: nn.Module, loader: DataLoader, device: str) -> float:
    """Fraction of ``loader``'s samples that ``net`` classifies correctly, in [0, 1].

    Called on rank 0 only, with the plain ``Net`` rather than its DDP wrapper: all ranks hold the
    same weights, so one rank scoring the whole test set gives the answer without splitting the
    test set or gathering results, and the other ranks do not need to wait for it. The wrapper's
    forward may talk to the other ranks (e.g. to sync buffers), which would hang if only one rank
    called it; the wrapped module shares the weights and runs locally.

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
    # torch.distributed.run starts one process per rank and sets RANK, LOCAL_RANK, WORLD_SIZE, etc.
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    torch.manual_seed(0)
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"  # one GPU per rank on this node
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    trainset, testset = data.load_datasets(args.dataset, args.data_path)
    flare.init()
    trainset = data.shard(trainset, flare.get_site_name(), flare.system_info()["num_sites"])
    # Each rank trains on its own 1/world_size of the training set (DDP then averages their
    # gradients); without the sampler every rank would go through all the data, doing the same
    # work world_size times over.
    sampler = DistributedSampler(trainset, shuffle=True)
    trainloader = DataLoader(trainset, batch_size=args.batch_size, sampler=sampler)
    testloader = DataLoader(testset, batch_size=256)
    net = Net().to(device)
    ddp = DDP(net, device_ids=[local_rank] if torch.cuda.is_available() else None)

    while flare.is_running():
        net.load_state_dict(flare.receive().params)
        if rank == 0:
            accuracy = evaluate(net, testloader, device)
            print(f"Accuracy before training: {100 * accuracy:.1f} %")
        steps = train(ddp, trainloader, 0 if flare.is_evaluate() else args.epochs, args.lr, device)
        if rank == 0:
            print(f"Finished training: {steps} steps")
            flare.send(flare.FLModel(params={k: v.cpu() for k, v in net.state_dict().items()}, metrics={"accuracy": accuracy}, meta={"NUM_STEPS_CURRENT_ROUND": steps}))

    if rank == 0:
        print(f"Accuracy of the network on the test images: {100 * evaluate(net, testloader, device):.1f} %")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
