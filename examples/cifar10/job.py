"""Run the CIFAR-10 example as a federated job: FedAvg over N sites, each running the FL script.

The job is built in Python (an initial model, an aggregation strategy, and the script every
site runs), then either run at once in flkit's simulator (server and sites on this machine)
or only exported as a job folder.

Every check of the options happens before flkit is imported or anything is started, so a
mistake on the command line costs nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOB_NAME = "cifar10_fedavg"
PORT_PLACEHOLDER = "{PORT}"

EXAMPLES = """\
examples (from examples/cifar10/):
  python job.py --script_args "--dataset digits" --num_rounds 5     # offline, sklearn digits
  python job.py                                                    # CIFAR-10, after ./prepare_data.sh
  python job.py --export_only --export_dir /tmp/flkit/jobs         # only write the job folder
  python job.py --script src/cifar10_lightning_fl.py --key_metric val_acc_epoch \
      --script_args "--dataset digits"                             # PyTorch Lightning
  python job.py --script src/cifar10_lightning_ddp_fl.py --launch_process \
      --script_args "--dataset digits"                             # Lightning DDP: it starts 2 ranks per site
  python job.py --script src/cifar10_ddp_fl.py --script_args "--dataset digits" --launch_process \
      --launch_command 'python3 -m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_port={PORT}' \
      --ports 7777,8888                                            # each site: 2-process DDP (torchrun)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--script",
        default="src/cifar10_fl.py",
        help="training script that every site runs, relative to the current folder or to this "
        "example's folder (default: %(default)s)",
    )
    parser.add_argument(
        "--script_args",
        default="",
        help='arguments passed to the script, as one string, e.g. "--dataset digits --epochs 1" '
        "(default: none)",
    )
    parser.add_argument(
        "--n_clients",
        type=int,
        default=2,
        help="number of sites, named site-1..site-N; each trains on its own 1/N of the training set "
        "(default: %(default)s)",
    )
    parser.add_argument("--num_rounds", type=int, default=2, help="FedAvg rounds (default: %(default)s)")
    parser.add_argument(
        "--key_metric",
        default=None,
        help="metric reported by the sites that picks the best global model, saved as "
        "best_FL_global_model.safetensors; higher is better (default: val_acc_epoch for the Lightning "
        "scripts, whose validate() logs it, accuracy for the others)",
    )
    parser.add_argument(
        "--launch_process",
        "--launch_external_process",
        dest="launch_process",
        action="store_true",
        help="start each site's script as a separate process with --launch_command (e.g. torchrun for "
        "multi-GPU DDP) instead of running it in a thread of this process; the process runs in "
        "<workspace>/<site> and its output is also kept in <workspace>/<site>/output.log (default: off)",
    )
    parser.add_argument(
        "--launch_command",
        default="python3 -u",
        help=f"command that starts the script when --launch_process is set (the script and --script_args "
        f"are appended); {PORT_PLACEHOLDER} in it is replaced by the site's port from --ports, or by a free "
        "port; a leading python/python3 is the Python running job.py (default: %(default)s)",
    )
    parser.add_argument(
        "--ports",
        default=None,
        help=f"comma-separated ports, one per site (site-1 gets the first), filled into "
        f"{PORT_PLACEHOLDER} of --launch_command, e.g. torchrun's --master_port; unused (with a note) unless "
        f"--launch_process is set and --launch_command has {PORT_PLACEHOLDER} (default: a free port per site)",
    )
    parser.add_argument(
        "--export_only",
        action="store_true",
        help="only write the job folder into --export_dir, do not run it (default: off)",
    )
    parser.add_argument(
        "--export_dir", default="/tmp/flkit/jobs", help="where --export_only writes the job (default: %(default)s)"
    )
    parser.add_argument(
        "--workspace",
        default="/tmp/flkit/workspace",
        help="simulator workspace: the global models land in <workspace>/server, each site's logs in "
        "its own folder (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        "--workers",
        dest="threads",
        type=int,
        default=None,
        help="the simulator's workers (default: --n_clients: each site keeps a worker and its script runs "
        "once for the job; with fewer, a site's script runs once per round on a free worker)",
    )
    parser.add_argument(
        "--backend",
        choices=("processes", "threads", "ray"),
        default="processes",
        help="where the simulator runs the scripts: worker processes, each site in its own folder "
        "<workspace>/<site> (processes), threads of this process (threads), or Ray actors (ray, needs "
        'flkit[ray]) (default: %(default)s)',
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def parse_ports(text: str | None) -> list[int]:
    """``"7777,8888"`` -> ``[7777, 8888]``; raises ValueError naming the bad entry."""
    if text is None or not text.strip():
        return []
    ports = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ValueError(f"{item!r} is not a port number (1-65535)")
        ports.append(int(item))
    if len(set(ports)) != len(ports):
        raise ValueError("the same port is given twice; every site needs its own")
    return ports


def port_in_use(port: int) -> bool:
    """True if something on this machine holds ``port`` (binding it on every interface fails)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def is_lightning(script: str) -> bool:
    """The Lightning scripts (cifar10_lightning*.py) train ``LitNet``, whose weights are named
    ``model.<layer>``; the plain ones train ``Net`` itself."""
    return Path(script).name.startswith("cifar10_lightning")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject inconsistent options with a clear message (exit status 2) before anything starts."""
    if args.n_clients < 1:
        parser.error(f"--n_clients must be at least 1, got {args.n_clients}")
    if args.num_rounds < 1:
        parser.error(f"--num_rounds must be at least 1, got {args.num_rounds}")
    if args.threads is None:
        args.threads = args.n_clients
    elif args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        args.ports = parse_ports(args.ports)
    except ValueError as e:
        parser.error(f"--ports: {e}")

    wants_port = PORT_PLACEHOLDER in args.launch_command
    if not args.launch_process and wants_port:
        parser.error(f"{PORT_PLACEHOLDER} in --launch_command only applies to an external process: add --launch_process")
    if args.ports and not (args.launch_process and wants_port):
        # As NVFlare's job script: the ports are only used where the launch command asks for them.
        why = "--launch_process is not set" if not args.launch_process else \
            f"--launch_command has no {PORT_PLACEHOLDER}"
        print(f"note: --ports {','.join(map(str, args.ports))} is not used ({why})", file=sys.stderr)
        args.ports = []
    if args.ports and len(args.ports) < args.n_clients:
        parser.error(
            f"--ports gives {len(args.ports)} port(s) for {args.n_clients} clients: "
            "give at least one port per site (site-1 gets the first)"
        )
    if args.launch_process and not args.export_only:
        for i, port in enumerate(args.ports[: args.n_clients], start=1):
            if port_in_use(port):
                parser.error(f"--ports: port {port} of site-{i} is already in use on this machine; pick another")

    if args.key_metric is None:
        args.key_metric = "val_acc_epoch" if is_lightning(args.script) else "accuracy"

    script = Path(args.script)
    if not script.is_file() and not script.is_absolute() and (HERE / script).is_file():
        script = HERE / script  # e.g. `python examples/cifar10/job.py` from the repository root
    if not script.is_file():
        parser.error(f"--script {args.script}: no such file")
    args.script = str(script)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    # Imported only now, so that --help and the checks above work even without torch or flkit.
    import torch
    from flkit import FLKitError, JobFailedError
    from flkit.job import FedAvgJob, ScriptRunner

    sys.path.insert(0, str(HERE / "src"))
    from net import Net

    torch.manual_seed(0)  # the same initial global model on every run
    try:
        if is_lightning(args.script):
            from lit_net import LitNet

            initial_model = LitNet()
        else:
            initial_model = Net()
        job = FedAvgJob(
            name=JOB_NAME,
            initial_model=initial_model,
            n_clients=args.n_clients,
            num_rounds=args.num_rounds,
            key_metric=args.key_metric,
            final_validation=True,  # score the final global model too (one more validate task)
        )
        if args.ports:  # each site's own port in its launch command, e.g. its DDP rendezvous port
            for i, port in enumerate(args.ports[: args.n_clients], start=1):
                command = args.launch_command.replace(PORT_PLACEHOLDER, str(port))
                job.to(ScriptRunner(args.script, args.script_args, True, command), f"site-{i}")
        else:  # the same script and arguments on site-1..site-N ({PORT}, if any: a free port at launch)
            job.to_clients(ScriptRunner(args.script, args.script_args, args.launch_process, args.launch_command))
        if args.export_only:
            print(f"Job {JOB_NAME!r} exported to {job.export_job(args.export_dir)}")
            return
        job.simulator_run(args.workspace, n_clients=args.n_clients, threads=args.threads, backend=args.backend)
    except JobFailedError as e:
        print(f"The job failed: {e}", file=sys.stderr)
        sys.exit(1)
    except FLKitError as e:  # e.g. a setting the library rejects before the job starts
        print(f"Could not run the job: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
