import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun rank has written and closed everything by now (its process group is destroyed).
    # Leave without the interpreter's shutdown: there, torch's and gloo's C++ threads are destroyed
    # in no fixed order, and one still joinable aborts the process ("terminate called without an
    # active exception", exit -6) after a run that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
