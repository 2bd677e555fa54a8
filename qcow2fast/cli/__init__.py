"""The ``qcow2fast`` command: qemu-img's subcommands, syntax, JSON keys and
exit statuses.

Every subcommand lives in its own module with ``add_parser(subparsers)``
and ``run(args) -> int``.  Errors are one line on stderr and exit status 1
(``--debug`` shows the traceback); subcommands with their own statuses
(check, compare) return them.  ``bench-suite`` runs the repository's
benchmark suite with its own options.
"""

import sys

from ..errors import Qcow2Error
from . import check_cmd, compare_cmd, create_cmd, dd_cmd, info_cmd, map_cmd, measure_cmd
from . import bench_cmd, convert_cmd, serve_cmd, snapshot_cmd, suite_cmd
from . import amend_cmd, bitmap_cmd, commit_cmd, rebase_cmd, resize_cmd
from ..host.limits import CpuGuard, memory_limit_note
from .getopt import options_first
from .options import Parser, UsageError, prog, set_prog

COMMANDS = [create_cmd, info_cmd, check_cmd, map_cmd, compare_cmd, measure_cmd, dd_cmd,
            convert_cmd, bench_cmd, serve_cmd, suite_cmd, commit_cmd, rebase_cmd, snapshot_cmd,
            bitmap_cmd, resize_cmd, amend_cmd]


def build_parser():
    parser = Parser(prog="qcow2fast", description="qemu-img compatible qcow2 tool")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv=None):
    set_prog(sys.argv[0] if argv is None else None)    # messages start "<prog>: "
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    # Under RLIMIT_CPU (prlimit --cpu, as for untrusted uploads): a clear
    # error rather than the kernel's SIGKILL.
    CpuGuard.install()
    try:
        if argv[:1] == [suite_cmd.NAME]:       # the suite parses its own options
            return suite_cmd.run_argv(argv[1:])
        if argv[:1] == [resize_cmd.NAME] and "-h" not in argv and "--help" not in argv:
            argv = resize_cmd.size_last(argv)     # the size may look like an option
        parser = build_parser()
        args = parser.parse_args(options_first(parser, argv))
        if not args.command:
            raise UsageError("a command is required (try --help)")
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
        print(f"{prog()}: {_describe(e)}", file=sys.stderr)
        return 1


def _describe(e):
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)
