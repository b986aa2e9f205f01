"""Preemption: whichever process a scheduler signals, training finishes its step, checkpoints and exits.

A scheduler may signal the launcher (Kubernetes signals a pod's PID 1), the training processes, or
the whole process group. The launchers forward SIGTERM to the training processes and wait for them,
for a grace period that is theirs, not ours (accelerate's single-process launcher: 5 s, fixed;
torchrun, used for several processes: `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, default 30 s; after it they
kill with SIGKILL). So that the checkpoint fits in it:
- validation and evaluation stop at their next denoising step or batch (`raise_if_preempted`), and
  the checkpoint is written right after;
- after each checkpoint, `grace_period_warning` compares step plus checkpoint time with the
  launcher's grace period and says what to do when it does not fit (see README, Preemption);
- a launcher that dies without forwarding (SIGKILL, a crash, the OOM killer) would leave the training
  processes training on, orphaned, so a launched training process asks the kernel for SIGTERM when its
  launcher dies (Linux's PR_SET_PDEATHSIG);
- the launcher may hold the read end of the training process's stderr (accelerate's single-process
  launcher does): once it is gone, a write would fail with EPIPE and kill the run before it can
  checkpoint. `keep_console_when_pipe_breaks` sends the output to a file in OUTPUT_DIR from then on.
"""

import errno
import logging
import os
import signal
import stat
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Set by `accelerate launch` (every launcher) and by torchrun (several processes) in the training processes.
LAUNCHER_ENVIRONMENT = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
# accelerate's single-process launcher: SIGTERM to the child, then SIGKILL after this many seconds.
ACCELERATE_SIMPLE_LAUNCHER_GRACE_S = 5
TORCHRUN_DEFAULT_GRACE_S = 30

_active_flag = None  # the PreemptionFlag installed by the training loop, if any


class Preempted(Exception):
    """Raised inside validation or evaluation when a stop was requested: the loop checkpoints next."""


def launched_by_a_launcher(environ=os.environ):
    return any(name in environ for name in LAUNCHER_ENVIRONMENT)


def launcher_grace_period(environ=os.environ):
    """(seconds, launcher name) the launcher waits after forwarding SIGTERM, or (None, None) without one."""
    if "TORCHELASTIC_RUN_ID" in environ:
        value = environ.get("PET_SHUTDOWN_TIMEOUT") or environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or ""
        grace = int(value) if value.strip().isdigit() else TORCHRUN_DEFAULT_GRACE_S
        return grace, "torchrun (accelerate launch, several processes)"
    if "ACCELERATE_MIXED_PRECISION" in environ:
        return ACCELERATE_SIMPLE_LAUNCHER_GRACE_S, "accelerate launch with one process"
    return None, None


def grace_period_warning(step_seconds, checkpoint_seconds, environ=os.environ):
    """A warning when one step plus a checkpoint takes longer than the launcher lets a signalled process live."""
    grace, launcher = launcher_grace_period(environ)
    needed = step_seconds + checkpoint_seconds
    if grace is None or needed <= grace:
        return None
    return (f"A step plus a checkpoint takes {needed:.0f} s here, but {launcher} kills the training process "
            f"{grace} s after forwarding SIGTERM: a preemption would lose the steps since the last checkpoint. "
            "Give the launcher a longer grace period (README, Preemption: TORCH_ELASTIC_SHUTDOWN_TIMEOUT for several "
            "processes; for one process run `python train_aria_distill.py ...` without a launcher).")


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


def raise_if_preempted():
    """In long work between steps (validation, evaluation): stop it at once when a stop was requested."""
    if _active_flag is not None and _active_flag.requested:
        raise Preempted()


def stop_when_preempted(pipeline, step, timestep, callback_kwargs):
    """A diffusers pipeline's `callback_on_step_end`: a preemption stops generation at the next denoising
    step, so the checkpoint it asks for is written within the launcher's grace period."""
    raise_if_preempted()
    return callback_kwargs


class PreemptionFlag:
    """Set by SIGTERM/SIGINT/SIGHUP (or the launcher's death); the loop finishes its step, checkpoints and exits.

    The exit status is 128 + the signal (143 for SIGTERM, 130 for Ctrl-C, 129 for a closed terminal),
    as a shell reports a process ended by that signal, so a scheduler can tell an interrupted run from
    a finished one. Processes that stop because another one was signalled exit with 143. SIGHUP is
    left alone when it is ignored (`nohup`), since then the user asked the run to outlive the terminal.
    """

    def __init__(self):
        self.requested = False
        self.signum = None

    def install(self):
        global _active_flag

        signals = [signal.SIGTERM, signal.SIGINT]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signals.append(signal.SIGHUP)
        for signum in signals:
            signal.signal(signum, self._handle)
        signal_when_the_launcher_dies(signal.SIGTERM)
        _active_flag = self

    def _handle(self, signum, frame):
        # Killed, the launcher sends this signal as it dies (PR_SET_PDEATHSIG): its pipe is gone, so the output
        # moves to the file before anything is written, rather than on the first write that fails.
        move_console_if_the_launcher_died()
        logger.warning("Received signal %d: finishing this step, then checkpointing and exiting.", signum)
        self.requested = True
        self.signum = signum

    @property
    def exit_status(self):
        return 128 + (self.signum or signal.SIGTERM)


class _ConsoleStream:
    """A text stream that moves to a file when its pipe breaks (the reader, e.g. the launcher, is gone)."""

    def __init__(self, stream, fallback_path):
        self._stream = stream
        self._fallback_path = fallback_path

    def _redirect(self):
        """Point this stream's file descriptor, and any other standard one on the same dead pipe, at the file."""
        broken = os.fstat(self._stream.fileno())
        target = os.open(self._fallback_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        for descriptor in (1, 2):
            try:
                status = os.fstat(descriptor)
            except OSError:
                continue
            if stat.S_ISFIFO(status.st_mode) and (status.st_dev, status.st_ino) == (broken.st_dev, broken.st_ino):
                os.dup2(target, descriptor)
        os.close(target)

    def redirect_if_on_a_pipe(self):
        if stat.S_ISFIFO(os.fstat(self._stream.fileno()).st_mode):
            self._redirect()

    def _retry(self, operation, *arguments):
        try:
            return operation(*arguments)
        except OSError as error:
            if not isinstance(error, BrokenPipeError) and error.errno != errno.EPIPE:
                raise
            self._redirect()
            return operation(*arguments)

    def write(self, text):
        return self._retry(self._stream.write, text)

    def flush(self):
        return self._retry(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


_console_streams = []  # the wrapped standard streams
_launcher_pid = None  # this process's parent when the streams were wrapped


def move_console_if_the_launcher_died():
    """When the parent that read our pipes has exited, point the wrapped streams at their file now."""
    if _launcher_pid is None or os.getppid() == _launcher_pid:
        return
    for console in _console_streams:
        try:
            console.flush()  # whatever is pending goes where it can, then the descriptor moves
        except OSError:
            pass
        console.redirect_if_on_a_pipe()


def keep_console_when_pipe_breaks(fallback_path):
    """Wrap sys.stdout/sys.stderr so that a broken pipe sends the rest of the output to `fallback_path`.

    Call before logging and progress bars are set up (they keep a reference to the stream).
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ConsoleStream) and hasattr(stream, "fileno"):
            try:
                stream.fileno()
            except (OSError, ValueError):  # e.g. pytest's capture: no descriptor to redirect
                continue
            console = _ConsoleStream(stream, fallback_path)
            setattr(sys, name, console)
            _console_streams.append(console)
    global _launcher_pid
    _launcher_pid = os.getppid()
