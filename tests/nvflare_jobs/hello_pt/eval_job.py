# A job script in the shape of NVFlare main's hello-world/hello-lightning-eval/job.py (recipe API):
# every site scores a saved model with client.py, which answers flare.is_evaluate() with metrics.
import argparse
import os

from nvflare.app_opt.pt.recipes.fedeval import FedEvalRecipe
from nvflare.recipe import PocEnv, SimEnv

from model import SimpleNetwork


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=24)
    parser.add_argument("--checkpoint", type=str, required=True, help="Path to the saved model to evaluate")
    parser.add_argument("--poc", action="store_true", help="run in a PocEnv instead of the simulator")
    parser.add_argument("--workspace_root", type=str, default="/tmp/nvflare/simulation")
    return parser.parse_args()


def main():
    args = define_parser()
    print(f"Running evaluation with pre-trained checkpoint: {args.checkpoint}")

    recipe = FedEvalRecipe(
        name="hello-pt-eval",
        min_clients=args.n_clients,
        model=SimpleNetwork(),
        eval_ckpt=os.path.abspath(args.checkpoint),
        eval_script="client.py",
        eval_args=f"--batch_size {args.batch_size}",
    )

    if args.poc:
        env = PocEnv(num_clients=args.n_clients)
    else:
        env = SimEnv(num_clients=args.n_clients, num_threads=args.n_clients, workspace_root=args.workspace_root)
    run = recipe.execute(env=env)
    print()
    print("Job Status is:", run.get_status())
    print("Result can be found in :", run.get_result())
    print("Job Status is:", run.get_status())
    print()


if __name__ == "__main__":
    main()
