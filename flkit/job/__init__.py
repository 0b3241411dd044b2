"""Building and running jobs, with NVFlare's job API and recipe API names.

Every name an NVFlare job script imports from ``nvflare.job_config``,
``nvflare.app_opt.pt.job_config``, ``nvflare.app_common``, ``nvflare.recipe`` or
``nvflare.app_opt.pt.recipes`` is importable from here (see the README's import table).
"""

from flkit.compat import IgnoredArgumentWarning
from flkit.job.components import (
    CrossSiteModelEval,
    DataKind,
    EvalController,
    FedAvg,
    IntimeModelSelector,
    MLflowReceiver,
    PTModel,
    Scaffold,
    TBAnalyticsReceiver,
    ValidationJsonGenerator,
    WandBReceiver,
)
from flkit.job.config import JobConfig, load_job
from flkit.job.envs import ExecEnv, PocEnv, ProdEnv, Run, SimEnv
from flkit.job.fed_job import ALL_SITES, BaseFedJob, FedAvgJob, FedJob
from flkit.job.recipe_utils import (
    add_cross_site_evaluation,
    add_experiment_tracking,
    add_final_global_evaluation,
    set_per_site_config,
)
from flkit.job.recipes import (
    CyclicRecipe,
    FedAvgRecipe,
    FedAvgRecipeWithHE,
    FedEvalRecipe,
    FedOptRecipe,
    FedProxRecipe,
    Recipe,
    ScaffoldRecipe,
    SwarmLearningRecipe,
)
from flkit.runner.script_runner import (
    BaseScriptRunner,
    ExchangeFormat,
    FrameworkType,
    PipeConnectType,
    ScriptRunner,
    SubprocessLauncher,
    TransferType,
)

__all__ = [
    "ALL_SITES",
    "BaseFedJob",
    "BaseScriptRunner",
    "CrossSiteModelEval",
    "CyclicRecipe",
    "DataKind",
    "EvalController",
    "ExchangeFormat",
    "ExecEnv",
    "FedAvg",
    "FedAvgJob",
    "FedAvgRecipe",
    "FedAvgRecipeWithHE",
    "FedEvalRecipe",
    "FedJob",
    "FedOptRecipe",
    "FedProxRecipe",
    "FrameworkType",
    "IgnoredArgumentWarning",
    "IntimeModelSelector",
    "JobConfig",
    "MLflowReceiver",
    "PTModel",
    "PipeConnectType",
    "PocEnv",
    "ProdEnv",
    "Recipe",
    "Run",
    "Scaffold",
    "ScaffoldRecipe",
    "ScriptRunner",
    "SimEnv",
    "SubprocessLauncher",
    "SwarmLearningRecipe",
    "TBAnalyticsReceiver",
    "TransferType",
    "ValidationJsonGenerator",
    "WandBReceiver",
    "add_cross_site_evaluation",
    "add_experiment_tracking",
    "add_final_global_evaluation",
    "load_job",
    "set_per_site_config",
]
