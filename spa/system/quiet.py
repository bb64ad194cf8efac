"""Silence library noise that says nothing to a user.

Used by every entry point (the `spa` command, the benchmark workers, the
backbone export) and by the `.pte` runner, so each is written once here.
"""

import contextlib
import logging
import os
import warnings


def quiet_libraries() -> None:
    """Hide deprecation warnings, library loggers and the progress bars of model loads."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "torch._export", "torch.utils._pytree", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence the C++ runtime's cpuinfo chatter, which it writes straight to fd 2."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
