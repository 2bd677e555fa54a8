"""qemu-img's command-line conventions: sizes with suffixes, ``-o key=val``
lists with ``,,`` escaping, booleans, human-readable sizes, and an
argument parser that reports usage errors with exit status 1 (argparse's 2
would read as "corrupt" to a script calling ``check``)."""

import argparse
import math
import os
import re
import sys

from ..errors import InvalidArgumentError

SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                 "p": 1 << 50, "e": 1 << 60}


_PROG = ["qcow2fast"]


def prog():
    """The name messages start with: as qemu's error_get_progname(), the
    base name the program was run as (``qemu-img`` for a qemu-img stand-in)."""
    return _PROG[0]


def warn(message):
    """A warning on stderr as qemu prints one: ``<prog>: warning: message``."""
    print(f"{prog()}: warning: {message}", file=sys.stderr)


def check_lines(lines):
    """A check's lines on stderr as qemu prints them: its own bare, those
    qemu reports as errors (fsck.result.ToolMessage) after ``<prog>: ``."""
    from ..fsck.result import ToolMessage
    for line in lines:
        print(f"{prog()}: {line}" if isinstance(line, ToolMessage) else line, file=sys.stderr)


def set_prog(argv0):
    name = os.path.basename(argv0 or "")
    _PROG[0] = "qcow2fast" if not name or name.endswith(".py") else name


class UsageError(InvalidArgumentError):
    """A bad command line: reported in one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        words = message.split()
        if message.startswith("unrecognized arguments: ") and words[2].startswith("-"):
            raise UsageError(f"unrecognized option '{words[2]}'\n"     # qemu-img's words
                             f"Try '{prog()} --help' for more information")
        command = self.prog.partition(" ")[2]
        raise UsageError(f"{command}: {message}" if command else message)


def strtosz(text):
    """qemu's qemu_strtosz: a decimal number with an optional fraction, or
    a hex one (0x...), then an optional suffix B/k/M/G/T/P/E (powers of
    1024; a fraction needs one; x.5 of the unit rounds up) -> bytes, below
    2^64.  ValueError if it is not such a number, OverflowError if too big."""
    m = re.fullmatch(r"\s*\+?(?:0[xX]([0-9a-fA-F]+)|([0-9]+)(\.[0-9]*)?)([bkmgtpeBKMGTPE]?)",
                     str(text))
    if not m:
        raise ValueError(text)
    hexdigits, integral, fraction, suffix = m.groups()
    mul = SIZE_SUFFIXES[suffix.lower()]
    if hexdigits is not None:
        value = int(hexdigits, 16)
        if suffix:
            print(f"{prog()}: warning: Using a multiplier suffix on hex numbers is "
                  f"deprecated: {text}", file=sys.stderr)
        value *= mul
    else:
        # qemu: the fraction read as a double, taken as 64.64 fixed point;
        # it needs a unit; the result rounded half up
        valf = int(float("0" + fraction) * 2.0 ** 64) % 2 ** 64 if fraction not in (None, ".") \
            else 0
        if valf and mul == 1:
            raise ValueError(text)
        value = int(integral) * mul + ((valf * mul + (1 << 63)) >> 64)
    if value >= 2 ** 64:
        raise OverflowError(text)
    return value


SIZE_HELP = ("Parameter '{key}' expects a non-negative number below 2^64\n"
             "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.")


def opt_size(text, key):
    """A size-typed ``-o`` option, as qemu's QemuOpts parse it (below 2^64)."""
    try:
        return strtosz(text)
    except (ValueError, OverflowError):
        raise UsageError(SIZE_HELP.format(key=key)) from None


def image_size(text):
    """qemu-img create's size operand, with its messages (below 2^63)."""
    try:
        value = strtosz(text)
    except ValueError:
        raise UsageError("Invalid image size specified. You may use k, M, G, T, P or E "
                         f"suffixes for\n{prog()}: kilobytes, megabytes, gigabytes, "
                         "terabytes, petabytes and exabytes.") from None
    except OverflowError:
        value = 2 ** 64
    if value >= 2 ** 63:
        raise UsageError("Invalid image size specified. Must be between 0 and "
                         f"{2 ** 63 - 1}.")
    return value


def parse_size(text, what="size"):
    """'1G', '1.5G', '512', '64k', '0x10000' -> bytes (qemu_strtosz), below 2^63."""
    try:
        value = strtosz(text)
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: use a number with an optional suffix "
                         "k, M, G, T, P or E") from None
    except OverflowError:
        value = 2 ** 64
    if value >= 2 ** 63:
        raise UsageError(f"{what} {text!r} is too large")
    return value


def split_options(text):
    """'a=1,b=x,,y' -> [('a', '1'), ('b', 'x,y')]; a bare word is ('word', None)."""
    items, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    out = []
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        out.append((key.strip(), value if sep else None))
    return out


def merge_options(option_args):
    """All ``-o`` arguments given, merged (later ones win) into a dict.
    Each must be a valid option list as qemu-img's is_valid_option_list
    says: not empty, no leading comma, no odd run of trailing commas (an
    escaped comma is ",,")."""
    merged = {}
    for text in option_args or ():
        trailing = len(text) - len(text.rstrip(","))
        if not text or text.startswith(",") or trailing % 2:
            raise UsageError(f"Invalid option list: {text}")
        for key, value in split_options(text):
            merged[key] = value
    return merged


def parse_bool(value, key):
    if value is None:
        return True
    v = value.lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise UsageError(f"parameter '{key}' expects 'on' or 'off', not {value!r}")


def size_to_str(n):
    """qemu's size_to_str: three significant digits, binary units."""
    if n == 0:
        return "0 B"
    _, e = math.frexp(n / (1000.0 / 1024.0))
    i = max(0, (e - 1) // 10)
    i = min(i, 6)
    unit = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][i]
    return f"{n / (1 << (10 * i)):0.3g} {unit}B"
