"""NVFlare's DDP client pattern (its hello-world `cifar10_ddp_fl.py`), on digits with gloo.

Written against NVFlare's Client API; the tests change only the import line. As in
NVFlare's example: init(rank=...) and is_running()/receive() on every rank; rank 0 loads
the received params and writes a checkpoint, a barrier, every rank loads it; all ranks
train the DDP model; rank 0 scores the received model and sends the result.

For the tests it also records, in its working folder (the site's workspace), what each
rank saw and what rank 0 sent, and can crash or hang on demand.
"""

from __future__ import annotations

import argparse
import json
import os
import threading

import nvflare.client as flare
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from digits_task import SmallNet, accuracy, load, train

CHECKPOINT = "./ddp_checkpoint.safetensors"
ROWS_PER_RANK = 320  # the same number of batches on every rank: DDP ranks step in lockstep


def record(rank: int, model: flare.FLModel) -> None:
    entry = {
        "round": model.current_round, "task": flare.get_task_name(), "is_train": flare.is_train(),
        "is_evaluate": flare.is_evaluate(), "checksum": sum(float(v.double().sum()) for v in model.params.values()),
    }
    with open(f"rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    save_file({k: v.contiguous() for k, v in model.params.items()},
              f"received_round{model.current_round}_rank{rank}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--crash_rank", type=int, default=-1)
    parser.add_argument("--crash_round", type=int, default=-1)
    parser.add_argument("--hang", action="store_true", help="stop mid-round forever (orphan tests)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with open(f"pid_rank{rank}.txt", "w") as fh:
        fh.write(f"{os.getpid()} {os.getppid()}")
    flare.init(rank=f"{rank}")
    site_index = int(flare.get_site_name().rsplit("-", 1)[1]) - 1
    x, y, test_x, test_y = load(shard=site_index * world + rank, num_shards=2 * world)
    x, y = x[:ROWS_PER_RANK], y[:ROWS_PER_RANK]
    net = SmallNet()
    ddp_model = DDP(net)

    while flare.is_running():
        input_model = flare.receive()
        record(rank, input_model)
        if args.hang:
            print(f"READY rank={rank} pid={os.getpid()}", flush=True)
            threading.Event().wait()
        if rank == 0:
            net.load_state_dict(input_model.params)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, CHECKPOINT)
        dist.barrier()  # the others load what rank 0 wrote
        net.load_state_dict(load_file(CHECKPOINT))
        if rank == args.crash_rank and input_model.current_round == args.crash_round:
            raise RuntimeError(f"deliberate failure on rank {rank} in round {input_model.current_round}")

        # Sites train different amounts, so FedAvg's weighting is visible in the aggregate.
        epochs = (site_index + 1) * args.epochs if flare.is_train() else 0
        steps = train(ddp_model, x, y, epochs=epochs, seed=input_model.current_round)

        if rank == 0:
            received = SmallNet()
            received.load_state_dict(input_model.params)
            score = accuracy(received, test_x, test_y)
            params = {k: v.clone() for k, v in net.state_dict().items()}
            save_file(params, f"sent_round{input_model.current_round}.safetensors")
            flare.send(flare.FLModel(params=params, metrics={"accuracy": score},
                                     meta={"NUM_STEPS_CURRENT_ROUND": steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
