"""Client-side pieces of algorithms for PyTorch scripts, at NVFlare's ``nvflare.app_opt.pt`` names:
``PTFedProxLoss`` (FedProx's proximal term), ``PTScaffoldHelper`` and ``get_lr_values`` (SCAFFOLD)."""

from flkit.pt.fedproxloss import PTFedProxLoss
from flkit.pt.scaffold import PTScaffoldHelper, get_lr_values

__all__ = ["PTFedProxLoss", "PTScaffoldHelper", "get_lr_values"]
