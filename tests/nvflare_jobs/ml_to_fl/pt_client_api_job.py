# A job script in the shape of NVFlare 2.6's hello-world/ml-to-fl/pt/pt_client_api_job.py.
import argparse

from nvflare.app_opt.pt.job_config.fed_avg import FedAvgJob
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

from src.net import Net


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=2)
    parser.add_argument("--script", type=str, default="src/cifar10_fl.py")
    parser.add_argument("--key_metric", type=str, default="accuracy")
    parser.add_argument("--launch_external_process", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--launch_command", type=str, default="python3 -u")
    parser.add_argument("--ports", type=str, default="7777,8888")
    parser.add_argument("--export_config", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--workdir", type=str, default="/tmp/nvflare/jobs/workdir")
    return parser.parse_args()


def main():
    args = define_parser()
    n_clients = args.n_clients
    ports = args.ports.split(",")

    job = FedAvgJob(
        name="pt_client_api",
        n_clients=n_clients,
        num_rounds=args.num_rounds,
        key_metric=args.key_metric,
        initial_model=Net(),
    )

    for i in range(n_clients):
        executor = ScriptRunner(
            script=args.script,
            launch_external_process=args.launch_external_process,
            command=args.launch_command.replace("{PORT}", ports[i]),
            framework=FrameworkType.PYTORCH,
        )
        job.to(executor, f"site-{i + 1}")

    if args.export_config:
        job.export_job("/tmp/nvflare/jobs/job_config")
    else:
        job.simulator_run(args.workdir, gpu="0")


if __name__ == "__main__":
    main()
