"""Preemption: whichever process a scheduler signals, training finishes its step, checkpoints and exits.

A scheduler may signal the launcher (Kubernetes signals a pod's PID 1), the training processes, or
the whole process group. The launchers forward SIGTERM to the training processes and wait for them,
for a grace period that is theirs, not ours (accelerate's single-process launcher: 5 s; torchrun,
used for several processes: 30 s; after it they kill with SIGKILL). A launcher that dies without
forwarding (SIGKILL, a crash, the OOM killer) would leave the training processes training on,
orphaned, until they are killed without a checkpoint: so a launched training process asks the
kernel for SIGTERM when its launcher dies (Linux's PR_SET_PDEATHSIG).
"""

import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Set by `accelerate launch` (every launcher) and by torchrun (several processes) in the training processes.
LAUNCHER_ENVIRONMENT = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")


def launched_by_a_launcher(environ=os.environ):
    return any(name in environ for name in LAUNCHER_ENVIRONMENT)


def signal_when_the_launcher_dies(signum=signal.SIGTERM):
    """Ask the kernel to send `signum` to this process when its parent (the launcher) exits.

    Only for launched processes: a script started from a shell under nohup must outlive the shell.
    Returns True when the request was registered (Linux), False elsewhere.
    """
    if not sys.platform.startswith("linux") or not launched_by_a_launcher():
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class PreemptionFlag:
    """Set by SIGTERM/SIGINT (or the launcher's death); the loop finishes its step, checkpoints and exits.

    The exit status is 128 + the signal (143 for SIGTERM, 130 for Ctrl-C), as a shell reports a
    process ended by that signal, so a scheduler can tell an interrupted run from a finished one.
    Processes that stop because another one was signalled exit with 143.
    """

    def __init__(self):
        self.requested = False
        self.signum = None

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        signal_when_the_launcher_dies(signal.SIGTERM)

    def _handle(self, signum, frame):
        logger.warning("Received signal %d: finishing this step, then checkpointing and exiting.", signum)
        self.requested = True
        self.signum = signum

    @property
    def exit_status(self):
        return 128 + (self.signum or signal.SIGTERM)
