"""Never calls flkit.init(): it hangs (launch_timeout must stop it)."""
import threading

print("loading a very large dataset...", flush=True)
threading.Event().wait(120)
