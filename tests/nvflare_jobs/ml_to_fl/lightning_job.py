# A job script in the shape of NVFlare 2.6's hello-world/ml-to-fl/pt/lightning_job.py.
import argparse

from nvflare.app_common.launchers.subprocess_launcher import SubprocessLauncher
from nvflare.app_opt.pt.job_config.fed_avg import FedAvgJob
from nvflare.job_config.script_runner import BaseScriptRunner, FrameworkType

from src.lit_net import LitNet


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=2)
    parser.add_argument("--script", type=str, default="src/cifar10_lightning_fl.py")
    parser.add_argument("--key_metric", type=str, default="val_acc")
    parser.add_argument("--launch_external_process", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--export_config", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--workdir", type=str, default="/tmp/nvflare/jobs/workdir")
    return parser.parse_args()


def main():
    args = define_parser()

    job = FedAvgJob(
        name="pt_lightning_client_api",
        n_clients=args.n_clients,
        num_rounds=args.num_rounds,
        key_metric=args.key_metric,
        initial_model=LitNet(),
    )

    for i in range(args.n_clients):
        executor = BaseScriptRunner(
            script=args.script,
            launch_external_process=args.launch_external_process,
            framework=FrameworkType.PYTORCH,
            launcher=SubprocessLauncher(script=f"python3 -u custom/{args.script}", shutdown_timeout=100.0),
        )
        job.to(executor, f"site-{i + 1}")

    if args.export_config:
        job.export_job("/tmp/nvflare/jobs/job_config")
    else:
        job.simulator_run(args.workdir, gpu="0")


if __name__ == "__main__":
    main()
