"""How every command line of this project turns a user's mistake into a message, never a traceback.

- `UserInputError`: the base of every input error the units raise (corpus, paired data, regions,
  evaluation, checkpoints). Its message already names the flag or file and the fix.
- `argument_parser`: argparse without abbreviations. With them `--hub_tok VALUE` would be taken for
  `--hub_token VALUE`, escape the redaction of the secret flag, and land in the model card.
- `run_cli`: runs a command's `main`, and prints `error: <message>` (exit 1) for input errors, a
  full or read-only disk (naming the path and the free space), and Ctrl-C (exit 130; a second Ctrl-C
  while the first unwinds ends the process at once instead of printing a traceback of the cleanup).
"""

import argparse
import errno
import os
import shutil
import signal
import sys

# Errors of the storage, not of the program: the user needs the path and what to do.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class UserInputError(ValueError):
    """Bad input; the message names the flag or file and the fix."""


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations, whose error messages never show the value of a secret flag.

    "unrecognized arguments: --hub_tok hf_..." would print a token that was typed under a misspelled
    name, so any value given to a flag whose name looks like a secret's is masked in the message.
    """

    secret_words = ("token", "password", "secret", "api_key")
    secret_flags = ()

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _secret_values(self):
        values, given = [], getattr(self, "_given", [])
        for position, item in enumerate(given):
            name, separator, value = str(item).partition("=")
            if not name.startswith("-") or not self._looks_secret(name):
                continue
            if separator:
                values.append(value)
            elif position + 1 < len(given):
                values.append(str(given[position + 1]))
        return [value for value in values if value]

    def _looks_secret(self, name):
        """A flag named like a secret, or a misspelling of a secret flag by prefix (`--hub_tok`)."""
        normal = "--" + name.lstrip("-").lower().replace("-", "_")
        return (any(word in normal for word in self.secret_words)
                or any(flag.startswith(normal) and len(normal) >= 5 for flag in self.secret_flags))

    def error(self, message):
        for value in self._secret_values():
            message = message.replace(value, "***")
        super().error(message)


def argument_parser(description, secret_flags=()):
    """An ArgumentParser without abbreviations; `secret_flags` (e.g. "--hub_token") are masked in its errors."""
    parser = _Parser(description=description, allow_abbrev=False)
    parser.secret_flags = tuple(secret_flags)
    return parser


def free_space_text(path):
    """'N.N GiB free on <mount>' for the file system holding `path` (its nearest existing folder)."""
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 1024 ** 3:.2f} GiB free there"


def storage_problem(error, path=None):
    """A message for an OSError of the storage (disk full, read-only, no permission), else None."""
    if not isinstance(error, OSError) or error.errno not in DISK_FULL_ERRNOS + NOT_WRITABLE_ERRNOS:
        return None
    path = path or error.filename or "the output folder"
    if error.errno in DISK_FULL_ERRNOS:
        return (f"could not write {path}: the disk is full ({free_space_text(path)}). Free space (or choose a "
                "folder on a larger disk) and run the same command again; finished work is kept.")
    if error.errno == errno.EROFS:
        return f"could not write {path}: it is on a read-only file system. Choose a folder you can write to."
    return (f"{path}: {os.strerror(error.errno).lower()}. Give this user access to it, or choose a folder it can "
            "read and write.")


def writable_folder_problem(path, flag):
    """A message when folder `path` (or, if it does not exist yet, its nearest existing parent) cannot be written."""
    import tempfile

    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    try:
        handle, probe = tempfile.mkstemp(prefix=".aria-write-test-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        reason = ("the disk is full" if error.errno in DISK_FULL_ERRNOS
                  else os.strerror(error.errno).lower() if error.errno else str(error))
        return f"{flag} {path!r} cannot be written ({folder}: {reason}); choose a folder you can write to."
    return None


def _second_interrupt_exits(signum, frame):
    sys.stderr.write("\nerror: interrupted again; stopping now.\n")
    os._exit(128 + signum)


def _first_interrupt(signum, frame):
    signal.signal(signal.SIGINT, _second_interrupt_exits)
    raise KeyboardInterrupt


def run_cli(main, argv=None):
    """Run `main(argv)`; input, storage and interruption errors end with a message and a status, no traceback."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _first_interrupt)
    try:
        return main(argv)
    except UserInputError as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, _second_interrupt_exits)
        sys.stderr.write("\nerror: interrupted (Ctrl-C); run the same command again to continue.\n")
        raise SystemExit(128 + signal.SIGINT) from None
    except OSError as error:
        problem = storage_problem(error)
        if problem is None:
            raise
        raise SystemExit(f"error: {problem}") from None
