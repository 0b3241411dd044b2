"""A framework=NUMPY script: it must get numpy arrays, and it answers with numpy arrays (params + 1)."""
import numpy as np

import flkit as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    wrong = {name: type(value).__name__ for name, value in model.params.items() if not isinstance(value, np.ndarray)}
    assert not wrong, f"framework=numpy gave the script non-numpy params: {wrong}"
    params = {name: value + np.float32(1) for name, value in model.params.items()}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in params.values())
    flare.send(flare.FLModel(params=params, metrics={"accuracy": 0.5}))
