# A job script in the shape of NVFlare's getting-started notebooks: the server side put together
# by hand with job.to(..., "server") (a FedAvg controller, the model, a model selector).
import argparse

from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
from nvflare.job_config.api import FedJob
from nvflare.job_config.script_runner import ScriptRunner

from src.net import Net


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=2)
    parser.add_argument("--base_fed_job", action="store_true", help="BaseFedJob(initial_model=...) as the notebook")
    parser.add_argument("--workdir", type=str, default="/tmp/nvflare/jobs/workdir")
    parser.add_argument("--export_dir", type=str, default="/tmp/nvflare/jobs/job_config")
    args = parser.parse_args()

    if args.base_fed_job:
        job = BaseFedJob(name="cifar10_pt_fedavg", initial_model=Net())
    else:
        job = FedJob(name="cifar10_pt_fedavg")
        job.to(Net(), "server")
        job.to(IntimeModelSelector(key_metric="accuracy"), "server")
    controller = FedAvg(num_clients=args.n_clients, num_rounds=args.num_rounds)
    job.to(controller, "server")

    for i in range(args.n_clients):
        runner = ScriptRunner(script="src/cifar10_fl.py", script_args="")
        job.to(runner, f"site-{i + 1}")

    job.export_job(args.export_dir)
    job.simulator_run(args.workdir, gpu="0")


if __name__ == "__main__":
    main()
