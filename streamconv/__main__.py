"""``python -m streamconv`` is the ``streamconv`` command."""

import os
import sys

from .cli import main
from .core.launch import under_torchrun

code = main()
if under_torchrun():
    # A torchrun worker whose work is done (files committed, tracker written by then): leave without running
    # interpreter and C++ static destructors, where c10d/gloo threads still alive at exit occasionally end the
    # process in std::terminate (SIGABRT) and torchrun would report a finished conversion as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
