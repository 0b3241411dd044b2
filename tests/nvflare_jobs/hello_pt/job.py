# A job script in the shape of NVFlare main's hello-world/hello-pt/job.py (recipe API).
import argparse

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe import PocEnv, SimEnv, add_experiment_tracking
from nvflare.recipe.utils import add_cross_site_evaluation

from model import SimpleNetwork


def define_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train_script", type=str, default="client.py")
    parser.add_argument("--cross_site_eval", action="store_true")
    parser.add_argument("--poc", action="store_true", help="run in a PocEnv instead of the simulator")
    parser.add_argument("--workspace_root", type=str, default="/tmp/nvflare/simulation")
    return parser.parse_args()


def main():
    args = define_parser()

    recipe = FedAvgRecipe(
        name="hello-pt",
        min_clients=args.n_clients,
        num_rounds=args.num_rounds,
        model=SimpleNetwork(),
        train_script=args.train_script,
        train_args=f"--batch_size {args.batch_size} --epochs {args.epochs}",
    )
    add_experiment_tracking(recipe, tracking_type="tensorboard")
    if args.cross_site_eval:
        add_cross_site_evaluation(recipe)

    if args.poc:
        env = PocEnv(num_clients=args.n_clients)
    else:
        env = SimEnv(num_clients=args.n_clients, workspace_root=args.workspace_root)
    run = recipe.execute(env)
    print()
    print("Job Status is:", run.get_status())
    print("Result can be found in :", run.get_result())
    print("Job Status is:", run.get_status())
    print()


if __name__ == "__main__":
    main()
