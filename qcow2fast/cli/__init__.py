"""The ``qcow2fast`` command: qemu-img's subcommands, syntax, JSON keys and
exit statuses.

Every subcommand lives in its own module with ``add_parser(subparsers)``
and ``run(args) -> int``.  Errors are one line on stderr and exit status 1
(``--debug`` shows the traceback); subcommands with their own statuses
(check, compare) return them.  ``bench-suite`` runs the repository's
benchmark suite with its own options.
"""

import signal
import sys
import warnings
from importlib import import_module

from ..errors import Qcow2Error, RepairWarning
from ..host.limits import CpuGuard, memory_limit_note
from .getopt import options_first
from .options import Parser, check_lines, error_exit, prog, set_prog

# Each subcommand -> the module implementing it.  Only the module of the
# subcommand being run is imported (start-up is most of a small command's
# time: tests/unit/test_startup.py); --help and unknown commands load all.
COMMANDS = {"create": "create_cmd", "info": "info_cmd", "check": "check_cmd", "map": "map_cmd",
            "compare": "compare_cmd", "measure": "measure_cmd", "dd": "dd_cmd",
            "convert": "convert_cmd", "bench": "bench_cmd", "serve": "serve_cmd",
            "bench-suite": "suite_cmd", "commit": "commit_cmd", "rebase": "rebase_cmd",
            "snapshot": "snapshot_cmd", "bitmap": "bitmap_cmd", "resize": "resize_cmd",
            "amend": "amend_cmd", "fleet": "fleet_cmd"}


# Commands that change an image in place die on SIGINT as qemu-img does (no
# handler): what is on disk is then a crash state, which the ordered
# barriers keep consistent (leaks at most; tests/crash).  A
# KeyboardInterrupt would instead unwind into close(), which flushes
# metadata that the interrupted update may have left half-changed in memory.
DIE_ON_SIGINT = {"amend", "bitmap", "check", "commit", "rebase", "resize", "snapshot"}


def command_module(name):
    return import_module(f".{COMMANDS[name]}", __name__)


def build_parser(only=None):
    """The command line's parser: every subcommand, or ``only`` that one."""
    parser = Parser(prog="qcow2fast", description="qemu-img compatible qcow2 tool")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        command_module(name).add_parser(sub)
    return parser


def command_index(argv):
    """Where the subcommand is in ``argv`` (its length if there is none)."""
    return next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))


def command_name(argv):
    """The subcommand ``argv`` runs, or None if it is not plainly one (then
    the full parser answers: help, or argparse's error)."""
    for arg in argv:
        if arg != "--debug":
            return arg if arg in COMMANDS else None
    return None


def stdout_as_c():
    """stdout buffered as C's stdio buffers qemu-img's: by line on a
    terminal, fully otherwise (PYTHONUNBUFFERED too), so that stdout and
    stderr sent to one pipe interleave as qemu-img's do (its report after
    the check's messages); where qemu-img flushes (create's Formatting
    line, progress), the commands flush too."""
    try:
        if not sys.stdout.isatty():
            sys.stdout.reconfigure(write_through=False, line_buffering=False)
    except (AttributeError, ValueError, OSError):
        pass        # (a replaced stdout: left as it is)


def show_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the command line: a repair made on opening
    (errors.RepairWarning) shows the lines qemu-img prints for it."""
    lines = getattr(message, "qemu_lines", None)
    if isinstance(message, RepairWarning) and lines is not None:
        check_lines(lines)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv=None):
    set_prog(sys.argv[0] if argv is None else None)    # messages start "<prog>: "
    argv_given = argv
    if argv is None:
        stdout_as_c()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[:command_index(argv)]
    # Under RLIMIT_CPU (prlimit --cpu, as for untrusted uploads): a clear
    # error rather than the kernel's SIGKILL.
    CpuGuard.install(prog())
    warnings.showwarning = show_warning
    warnings.simplefilter("always", RepairWarning)
    try:
        name = command_name(argv)
        if name in DIE_ON_SIGINT and argv_given is None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if argv[:1] == ["bench-suite"]:       # the suite parses its own options
            return command_module("bench-suite").run_argv(argv[1:])
        if argv[:1] == ["resize"] and "-h" not in argv and "--help" not in argv:
            argv = command_module("resize").size_last(argv)   # the size may look like an option
        parser = build_parser(name)
        args, extra = parser.parse_known_args(options_first(parser, argv))
        if extra:
            raise parser.extra_arguments(name, extra)
        if not args.command:
            raise error_exit("Not enough arguments")
        from ..host.remote_nbd import one_connection_per_export
        with one_connection_per_export():
            return args.run(args)
    except SystemExit as e:            # --help, or argparse's own exits
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{prog()}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print(f"{prog()}: out of memory{memory_limit_note()}", file=sys.stderr)
        return 1
    except (Qcow2Error, OSError) as e:
        if debug:
            raise
        print(f"{prog()}: {describe(e)}", file=sys.stderr)
        return 1


def describe(e):
    if getattr(e, "opening", None) and getattr(e, "qemu", None):
        return f"Could not open '{e.opening}': {e.qemu}"     # a backing file (engine/chain.py)
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)
