"""Records its pid, then takes a minute before calling flkit.init() (an init-timeout test)."""
import os
import threading

with open("slow_init.pid", "w") as fh:
    fh.write(str(os.getpid()))
threading.Event().wait(60)

import flkit as flare  # noqa: E402

flare.init()
