"""How every command ends: exit 0; one line on stderr and exit 2 for a problem with the input, the files or the
machine; 128 + signal number when SIGINT (130), SIGTERM (143) or SIGUSR1 (138) stopped it; a one-line report and
exit 1 for a bug. ``--debug`` shows the traceback instead of the line."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, NoReturn

from .errors import STOP_SIGNALS, CheckpointError, Stopped, out_of_memory
from .optional import third_party_import_error

INCEPTION_TORCHSCRIPT_HELP = (
    "load --inception as TorchScript, i.e. run the file as a program instead of reading its weights: TorchScript can "
    "read, write and overwrite any file this process may (a crafted file has done so); only for a file you trust "
    "that is not NVlabs' Inception-v3 (whose weights are read without it)")
_whole_process = False  # set by run_as_process: the command is the process, its end is the process's end


def run_as_process(main: Callable[[], int]) -> NoReturn:
    """``python -m emd_fast.<command>``: exit with ``main()``'s code. Stop signals arriving after the command ended
    are ignored (called in-process, run_command gives the previous handlers back instead): a Ctrl-C in the instant
    before the interpreter exits must not raise in its clean-up. A process of a distributed run ends without the
    interpreter's shutdown, its output flushed (``distributed.joined_a_process_group``)."""
    global _whole_process
    _whole_process = True
    code = main()
    distributed = sys.modules.get("emd_fast.execution.distributed")
    if distributed and distributed.joined_a_process_group():  # see joined_a_process_group: skip the shutdown
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class Interrupted(BaseException):
    """A stop signal outside the training loop (where a stop cannot wait for an iteration boundary)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    """The first stop signal unwinds the command (cleaning up on the way); the ones after it are ignored, so a
    second Ctrl-C cannot break into that clean-up."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What every command's parser shares: --debug, and usage errors in one line (``one_line_errors``)."""
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return one_line_errors(parser)


def path_arg(text: str) -> Path:
    """A path option's value; an empty one (an unset shell variable: ``--out "$RUN"``) is refused, not read as the
    current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return Path(text)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A bad command line is one line on stderr and exit 2 (argparse's own usage block runs to dozens of lines)."""
    def error(message: str) -> NoReturn:
        print(f"error: {message} ({parser.prog} --help lists the options)", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def run_command(body: Callable[[argparse.Namespace], None], args: argparse.Namespace, oom_hint: str) -> int:
    """Run ``body(args)`` and turn how it ends into an exit code (see the module docstring). SIGINT, SIGTERM and
    SIGUSR1 raise Interrupted wherever the training loop's handlers are not active (so they unwind and clean up);
    ``oom_hint`` says which options lower the memory needed. Python warnings raised on the way are shown when the
    command has succeeded (or with --debug): a failure is its one line, not warnings before it."""
    previous = {s: signal.signal(s, _interrupt) for s in STOP_SIGNALS
                if threading.current_thread() is threading.main_thread() and signal.getsignal(s) is not signal.SIG_IGN}
    with warnings.catch_warnings(record=True) as caught:
        try:
            code = _exit_code(body, args, oom_hint)
        finally:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_IGN if _whole_process else handler)
    if code == 0 or args.debug:
        for w in caught:
            print(warnings.formatwarning(w.message, w.category, w.filename, w.lineno), end="", file=sys.stderr)
    return code


def _exit_code(body: Callable[[argparse.Namespace], None], args: argparse.Namespace, oom_hint: str) -> int:
    try:
        body(args)
        return 0
    except Stopped as e:
        if str(e):  # rank 0 of a distributed run says it; the others stop silently
            print(str(e), file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        if (stop := _stop_in_chain(e)) is not None:  # a stop signal that some code wrapped in its own error
            print(f"stopped by {signal.Signals(stop).name}", file=sys.stderr)
            return 128 + stop
        if args.debug:
            raise
        if isinstance(e, MemoryError) or out_of_memory(e):
            print(f"error: out of memory ({first_line(e)}); {oom_hint}", file=sys.stderr)
            return 2
        if dependency := third_party_import_error(e):
            print(f"error: {dependency}", file=sys.stderr)
            return 2
        if isinstance(e, (ValueError, FloatingPointError, OSError, CheckpointError)):
            print(f"error: {first_line(e)}", file=sys.stderr)
            return 2
        print(f"internal error: {type(e).__name__}: {first_line(e)} (a bug in emd_fast: --debug shows the "
              f"traceback)", file=sys.stderr)
        return 1


def _stop_in_chain(e: BaseException) -> int | None:
    """The signal number of an Interrupted or KeyboardInterrupt that ``e`` was raised from or while handling (Python
    wraps an exception raised in e.g. ``__set_name__`` in a RuntimeError), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (Interrupted, KeyboardInterrupt)):
            return getattr(e, "signum", signal.SIGINT)
        e = e.__cause__ or e.__context__
    return None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
