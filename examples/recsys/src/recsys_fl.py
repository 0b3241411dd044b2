"""One site of the federated click model: train the received DLRM on this site's own click log.

Every site runs this script (flkit's Client API, NVFlare's names). A site makes its own log
from (``--seed``, its number in ``site-<n>``) with data.site_log(), so nothing is downloaded
or shared; the log is made only for a train task (a validate task needs only the held-out
set). Each task is answered the same way: score the received global model on the shared
held-out set (its AUC and log loss go back to the server, as in NVFlare, for the model
*received*), train it for ``--local_epochs`` on the local log, and send it back with the
number of optimizer steps, FedAvg's weight.

Nothing is kept in module-level state between tasks, and the training of a round depends only
on (seed, site, round), so a site gives the same answer whether its script stays alive for the
whole job or is started again for each task.
"""

from __future__ import annotations

import argparse

import flkit as flare
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import data
import metrics
from model import build_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed: the sites' logs and the held-out set")
    parser.add_argument("--alpha", type=float, default=data.DEFAULT_ALPHA,
                        help="Dirichlet concentration of each site's mix of user segments and item categories "
                        "(smaller: more skewed sites)")
    parser.add_argument("--local_epochs", type=int, default=2, help="passes over the local log per round")
    parser.add_argument("--batch_size", type=int, default=16, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=0.03, help="learning rate of Adam (fresh every round)")
    parser.add_argument("--id_l2", type=float, default=1.0,
                        help="L2 penalty on the user and item embeddings of each batch (a site sees each id a "
                        "few times at most: without it the model memorises the ids of its log)")
    return parser.parse_args()


def as_tensors(log: data.ClickLog) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.from_numpy(log.sparse), torch.from_numpy(log.dense), torch.from_numpy(log.clicked)


def train(model: nn.Module, log: data.ClickLog, epochs: int, batch_size: int, lr: float, id_l2: float,
          generator: torch.Generator) -> int:
    """Train ``model`` in place on ``log``; return the number of optimizer steps (0 if ``epochs`` is 0).

    A fresh Adam per call: its moments belong to the model it started from, not to this
    round's global model. ``generator`` shuffles the batches, so the site's training never
    touches torch's global random state (shared by the sites that run as threads of one process).
    """
    sparse, dense, clicked = as_tensors(log)
    ids = [data.SPARSE_FEATURES.index("user_id"), data.SPARSE_FEATURES.index("item_id")]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    model.train()
    steps = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(clicked), generator=generator).split(batch_size):
            s = sparse[batch]
            loss = F.binary_cross_entropy_with_logits(model(s, dense[batch]), clicked[batch])
            id_vectors = torch.cat([model.embeddings[i](s[:, i]) for i in ids], dim=1)
            loss = loss + id_l2 * id_vectors.pow(2).sum(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return steps


def evaluate(model: nn.Module, log: data.ClickLog) -> dict[str, float]:
    """AUC and log loss of ``model``'s click probabilities on ``log``."""
    sparse, dense, _ = as_tensors(log)
    model.eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(model(sparse, dense)).numpy()
    return {"auc": metrics.auc(probabilities, log.clicked), "log_loss": metrics.log_loss(probabilities, log.clicked)}


def main() -> None:
    args = parse_args()
    # The model is tiny: a second intra-op thread only adds synchronisation (and with the
    # simulator's threads backend, many sites share this process and this setting).
    torch.set_num_threads(1)
    flare.init()
    site = data.site_index(flare.get_site_name())
    model = build_model()
    log = None  # made at the first train task

    while flare.is_running():
        input_model = flare.receive()
        model.load_state_dict(input_model.params)
        scores = evaluate(model, data.held_out(args.seed))
        steps = 0
        if flare.is_train():
            if log is None:
                log = data.site_log(args.seed, site, args.alpha)
            round_seed = np.random.SeedSequence([args.seed, site, input_model.current_round or 0])
            generator = torch.Generator().manual_seed(int(round_seed.generate_state(1)[0]))
            steps = train(model, log, args.local_epochs, args.batch_size, args.lr, args.id_l2, generator)
        flare.send(flare.FLModel(params=model.state_dict(), metrics=scores, meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
