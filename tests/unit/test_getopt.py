"""The command line's getopt layer (cli/getopt.py) on arbitrary argument
lists: every subcommand's options, abbreviated, clustered, joined or not
to their values, among operands and ``--``.  Parsing ends in a namespace
or in a usage error in qemu-img's or qemu-nbd's words, never in another
exception."""

import contextlib
import io

import pytest
from hypothesis import given, settings, strategies as st

from qcow2fast.cli import COMMANDS, build_parser
from qcow2fast.cli.getopt import options_first, subcommands
from qcow2fast.cli.options import UsageError

PARSERS = {name: build_parser(name) for name in COMMANDS if name != "bench-suite"}


def words(name):
    """Strategy: one argument as a user might type it for ``name``."""
    sub = subcommands(PARSERS[name])[name]
    options = sorted(o for o in sub._option_string_actions if o not in ("-h", "--help"))
    longs = [o for o in options if o.startswith("--")]
    value = st.sampled_from(["", "x", "-1", "0x10", "1M", "qcow2", "a=b,c", "--", "-"])
    return st.one_of(
        st.sampled_from(options),
        st.builds(lambda o, v: f"{o}={v}", st.sampled_from(longs or ["--x"]), value),
        st.builds(lambda o, n: o[:max(3, len(o) - n)], st.sampled_from(longs or ["--x"]),
                  st.integers(0, 8)),                                   # abbreviations
        st.builds(lambda a, b: "-" + a.lstrip("-")[:1] + b.lstrip("-")[:1],
                  st.sampled_from(options), st.sampled_from(options)),  # clusters
        value, st.sampled_from(["img.qcow2", "--", "-", "-z", "--bogus"]))


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_argument_list_parses_or_is_a_usage_error(name, data):
    argv = data.draw(st.lists(words(name), max_size=8))
    parser = PARSERS[name]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, extra = parser.parse_known_args(options_first(parser, [name, *argv]))
            if extra:
                raise parser.extra_arguments(name, extra)
    except UsageError as e:
        assert str(e) and "Traceback" not in str(e)
    except SystemExit as e:                 # (-V, -T help: argparse's own exit)
        assert e.code in (0, None)
    else:
        assert args.command == name


@pytest.mark.parametrize("arg, message", [("--cache=--", "Invalid cache mode `--'"),
                                          ("--discard=--", "Invalid discard mode `--'")])
def test_an_option_valued_dash_dash_keeps_its_value(arg, message):
    """getopt gives ``--opt=--`` the value "--" (argparse drops it: found by
    the test above); qemu-nbd's message names it."""
    parser = PARSERS["serve"]
    with pytest.raises(UsageError, match=message):
        parser.parse_known_args(options_first(parser, ["serve", arg, "img.qcow2"]))
