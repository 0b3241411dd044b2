"""NVFlare's algorithm recipes and components on flkit's strategies: FedProxRecipe and
FedAvg(fedprox_mu=...), ScaffoldRecipe and the Scaffold controller, FedOptRecipe's optimizer_args
(known torch.optim paths only), each run as a user runs it (SimEnv), and FedProx in a Lightning
trainer patched with flare.patch."""

from __future__ import annotations

import json
import sys  # noqa: I001
from pathlib import Path

import pytest
import torch

from flkit.errors import ConfigError
from flkit.job import (
    FedAvg,
    FedJob,
    FedOptRecipe,
    FedProxRecipe,
    Scaffold,
    ScaffoldRecipe,
    ScriptRunner,
    SimEnv,
)
from flkit.job.recipes import fedopt_strategy

from conftest import SCRIPTS, with_flkit_import

sys.path.insert(0, str(SCRIPTS))
from digits_task import SmallNet  # noqa: E402

FEDPROX = str(SCRIPTS / "fedprox_digits.py")  # NVFlare's imports: runs go through with_flkit_import


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> dict[str, str]:
    """The NVFlare-shaped site scripts with only their import lines changed."""
    folder = tmp_path_factory.mktemp("code")
    return {name: str(with_flkit_import(SCRIPTS / f"{name}_digits.py", folder)) for name in ("fedprox", "scaffold")}


def _metrics(run) -> dict:
    return json.loads((Path(run.get_result()) / "server" / "metrics.json").read_text())


def test_fedprox_recipe_sends_mu_to_every_site_every_round(tmp_path, code):
    recipe = FedProxRecipe(min_clients=2, num_rounds=2, model=SmallNet(), train_script=code["fedprox"],
                           fedprox_mu=0.05)
    folder = recipe.export(tmp_path / "out")
    assert json.loads((folder / "job.json").read_text())["strategy"] == {"name": "fedprox",
                                                                          "args": {"fedprox_mu": 0.05}}
    run = recipe.execute(SimEnv(num_clients=2, workspace_root=str(tmp_path / "sim")))
    assert run.get_status().endswith("COMPLETED")
    rounds = [r for r in _metrics(run)["rounds"] if r["task"] == "train"]
    assert [sorted(r["metrics"]) for r in rounds] == [["site-1", "site-2"]] * 2
    assert {m["mu"] for r in rounds for m in r["metrics"].values()} == {0.05}


def test_fedprox_keeps_sites_closer_to_the_global_model(tmp_path, code):
    def moved(**strategy) -> float:
        job = FedJob(name="prox", min_clients=2, **strategy)
        job.to_server(FedAvg(num_clients=2, num_rounds=1, model=SmallNet()))
        job.to_clients(ScriptRunner(script=code["fedprox"]))
        ws = tmp_path / str(len(strategy))
        assert job.simulator_run(ws, n_clients=2, quiet=True, backend="threads").ok
        record = json.loads((ws / "server" / "metrics.json").read_text())["rounds"][0]
        return max(m["moved"] for m in record["metrics"].values())

    torch.manual_seed(0)
    plain = moved()
    torch.manual_seed(0)
    proximal = moved(strategy="fedprox", strategy_args={"fedprox_mu": 5.0})
    assert proximal < 0.5 * plain


@pytest.mark.parametrize("mu, expected", [(None, None), (0, None), (0.2, {"name": "fedprox",
                                                                          "args": {"fedprox_mu": 0.2}})])
def test_fedavg_component_with_fedprox_mu_is_fedprox_as_on_nvflare_main(mu, expected):
    job = FedJob(name="j", min_clients=2)
    job.to_server(FedAvg(num_clients=2, num_rounds=1, fedprox_mu=mu))
    assert job.strategy == expected


@pytest.mark.parametrize("build, message", [
    (lambda: FedAvg(fedprox_mu=-0.1), "fedprox_mu must be a finite number > 0"),
    (lambda: FedProxRecipe(min_clients=2, train_script=FEDPROX, model=SmallNet(), fedprox_mu=0),
     "FedProxRecipe: fedprox_mu must be a finite number > 0"),
    (lambda: FedJob(name="j", strategy="median").to_server(Scaffold(num_clients=2)),
     "job 'j' has strategy 'median', but its Scaffold controller runs 'scaffold'"),
])
def test_bad_algorithm_settings_are_refused(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.slow
def test_scaffold_recipe_runs_nvflare_shaped_scaffold_sites(tmp_path, code):
    recipe = ScaffoldRecipe(min_clients=2, num_rounds=2, model=SmallNet(), train_script=code["scaffold"])
    assert recipe.job.strategy == {"name": "scaffold", "args": {}}
    run = recipe.execute(SimEnv(num_clients=2, workspace_root=str(tmp_path / "sim")))
    assert run.get_status().endswith("COMPLETED")
    ws = Path(run.get_result())
    assert (ws / "server" / "strategy_state.safetensors").is_file()
    assert (ws / "site-1" / "scaffold" / "c_local.round-1.safetensors").is_file()


@pytest.mark.parametrize("optimizer_args, expected", [
    (None, ("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.0})),  # NVFlare's default: FedAvg's step
    ({}, ("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.0})),
    ({"name": "SGD", "args": {"lr": 1.0, "momentum": 0.6}},
     ("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.6})),
    ({"path": "torch.optim.SGD", "args": {"lr": 0.5, "momentum": 0.9}, "config_type": "dict"},
     ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9})),
    ({"path": "torch.optim.Adam", "args": {"lr": 0.01, "betas": [0.8, 0.99]}},
     ("fedadam", {"eta": 0.01, "beta_1": 0.8, "beta_2": 0.99, "tau": 1e-8, "bias_correction": True})),
    ({"path": "torch.optim.Adagrad", "args": {"lr": 0.1}}, ("fedadagrad", {"eta": 0.1, "tau": 1e-10})),
])
def test_fedopt_optimizer_args_map_known_torch_optim_paths(optimizer_args, expected):
    assert fedopt_strategy(optimizer_args) == expected


@pytest.mark.parametrize("optimizer_args, message", [
    ({"path": "torch.optim.RMSprop"}, "the server optimiser 'torch.optim.RMSprop' is not available"),
    ({"path": "os.system", "args": {}}, "the server optimiser 'os.system' is not available"),
    ({"path": "torch.optim.SGD", "args": {"lr": 1.0, "nesterov": True, "momentum": 0.9}},
     r"torch.optim.SGD\(nesterov=True\) is not available"),
    ({"path": "torch.optim.Adam", "args": {"foreach": True}}, r"arguments \['foreach'\] are not known"),
    ({"path": "torch.optim.SGD", "args": {"lr": -1.0}}, "server_learning_rate must be > 0"),
])
def test_fedopt_refuses_what_it_cannot_run(optimizer_args, message):
    with pytest.raises(ConfigError, match=message):
        FedOptRecipe(min_clients=2, train_script=FEDPROX, initial_model=SmallNet(), optimizer_args=optimizer_args)


def test_fedopt_recipe_runs_server_adam_on_diffs(tmp_path, code):
    with pytest.raises(ConfigError, match="server learning-rate schedules is not available"):
        FedOptRecipe(min_clients=2, train_script=FEDPROX, initial_model=SmallNet(),
                     lr_scheduler_args={"path": "torch.optim.lr_scheduler.CosineAnnealingLR", "args": {"T_max": 2}})
    recipe = FedOptRecipe(min_clients=2, num_rounds=2, train_script=code["fedprox"], initial_model=SmallNet(),
                          optimizer_args={"path": "torch.optim.Adam", "args": {"lr": 0.01}})
    folder = recipe.export(tmp_path / "out")
    job = json.loads((folder / "job.json").read_text())
    assert job["strategy"]["name"] == "fedadam"
    assert job["clients"]["params_transfer_type"] == "DIFF"  # as NVFlare's FedOpt: sites send differences
    run = recipe.execute(SimEnv(num_clients=2, workspace_root=str(tmp_path / "sim")))
    assert run.get_status().endswith("COMPLETED")
    state = json.loads((Path(run.get_result()) / "server" / "round_state.json").read_text())
    assert state["strategy"] == {"name": "fedadam", "state": {"steps": 2}}


@pytest.mark.slow
def test_a_patched_lightning_trainer_applies_fedprox_by_itself(tmp_path):
    """lit_digits_fl.py knows nothing of FedProx; with fedprox_mu in its task the patched trainer adds the
    proximal gradient, so the model it sends stays much closer to the global model it received."""
    from safetensors.torch import load_file

    from flkit.job import FedAvgJob
    from flkit.server.persistor import load_params

    from lit_digits import LitSmall

    def distance(label: str, **strategy) -> float:
        torch.manual_seed(0)
        initial = LitSmall()
        start = {k: v.clone() for k, v in initial.state_dict().items()}
        job = FedAvgJob(name="lit", initial_model=initial, n_clients=1, num_rounds=1, key_metric="val_acc_epoch",
                        final_validation=False, **strategy)
        job.to_clients(ScriptRunner(script=str(SCRIPTS / "lit_digits_fl.py"), script_args=f"--record_dir {tmp_path / label}"))
        assert job.simulator_run(tmp_path / f"ws-{label}", quiet=True).ok
        sent = load_file(str(tmp_path / label / "site-1-round0.safetensors"))
        assert load_params(tmp_path / f"ws-{label}" / "server" / "FL_global_model.safetensors").keys() == sent.keys()
        return sum(float((sent[k].float() - start[k].float()).pow(2).sum()) for k in start
                   if start[k].is_floating_point() and "running" not in k) ** 0.5

    plain = distance("plain")
    proximal = distance("prox", strategy="fedprox", strategy_args={"fedprox_mu": 10.0})
    assert proximal < 0.5 * plain


def test_fedprox_loss_and_lightning_gradient_by_hand():
    """PTFedProxLoss = mu/2 * sum (w - w_g)^2, over trainable parameters paired by name (DDP's prefix
    stripped); the patched trainer's term adds its gradient mu * (w - w_g)."""
    from flkit.pt import PTFedProxLoss
    from flkit_lightning.callback import FedProxTerm

    local, global_ = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        local.weight.copy_(torch.tensor([[1.0, 2.0]]))
        local.bias.fill_(3.0)
        global_.weight.copy_(torch.tensor([[0.0, 0.0]]))
        global_.bias.fill_(1.0)
    # (1 + 4 + 4) * 0.5 / 2
    assert PTFedProxLoss(mu=0.5)(local, global_).item() == pytest.approx(2.25)
    wrapped = torch.nn.Sequential()
    wrapped.add_module("module", local)  # named like DDP's wrapper: module.weight, module.bias
    assert PTFedProxLoss(mu=0.5)(wrapped, global_).item() == pytest.approx(2.25)
    with pytest.raises(ValueError, match="mu must be a finite number >= 0"):
        PTFedProxLoss(mu=-1.0)
    term = FedProxTerm(0.5, {name: p.detach().clone() for name, p in global_.named_parameters()})
    local.weight.grad, local.bias.grad = torch.zeros(1, 2), torch.ones(1)
    term.add_gradient(local)
    assert local.weight.grad.tolist() == [[0.5, 1.0]] and local.bias.grad.tolist() == [2.0]  # 1 + 0.5 * 2


def test_scaffold_helper_terms_by_hand():
    """One SGD step of lr 0.5 from w = 1 to 0 with c_global = 0.2, c_local = 0: the step is corrected by
    -lr * (c - c_i) = -0.1, and c_i+ = c_i - c + (w_g - w) / (K * lr) = 0 - 0.2 + (1 - (-0.1)) / 0.5 = 2.0."""
    from flkit.pt import PTScaffoldHelper

    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    global_net = torch.nn.Linear(1, 1, bias=False)
    global_net.load_state_dict(net.state_dict())
    helper = PTScaffoldHelper()
    helper.init(net)
    helper.load_global_controls({"weight": torch.full((1, 1), 0.2)})
    c_global, c_local = helper.get_params()
    with torch.no_grad():
        net.weight.fill_(0.0)  # the optimiser's step
    helper.model_update(net, 0.5, c_global, c_local)
    assert net.weight.item() == pytest.approx(-0.1)
    helper.terms_update(net, 0.5, c_global, c_local, global_net)
    assert float(helper.get_delta_controls()["weight"].item()) == pytest.approx(2.0)
    assert helper.c_local["weight"].item() == pytest.approx(2.0)
