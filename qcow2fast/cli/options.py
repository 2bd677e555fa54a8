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
from .getopt import subcommands

INT_MAX = 2 ** 31 - 1      # C's, as qemu-img bounds some sizes

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


def error_exit(message):
    """qemu-img's error_exit(): a usage error followed by the line that
    points to --help (qemu's error_report() is a plain UsageError)."""
    return UsageError(f"{message}\nTry '{prog()} --help' for more information")


# argparse's refusal of a value outside an option's choices -> qemu-img's
# words (error_exit's when with_hint): {value} is the value given.
CHOICE_ERRORS = {
    "--output": ("--output must be used with human or json as argument.", False),
    "-r": ("Unknown option value for -r (expecting 'leaks' or 'all'): {value}", True),
    "COMMAND": ("Command not found: {value}", True),
}


class QemuImgWords:
    """How qemu-img words a usage error: error_exit's hint after it, and
    for a bad option (its getopt string starts with ':', so getopt itself
    prints nothing) the word as typed."""

    @staticmethod
    def usage(message):
        return error_exit(message)

    @staticmethod
    def getopt(kind, word, option):
        """``kind``: unrecognized, invalid (a short option), ambiguous,
        no-argument (a value given to a flag) or missing (no value);
        ``word``: the argument as typed; ``option``: its letter, its long
        name or, when ambiguous, the candidates' names."""
        if kind == "missing":
            return error_exit(f"missing argument for option '{word}'")
        return error_exit(f"unrecognized option '{word}'")


class QemuNbdWords:
    """How qemu-nbd words one: glibc getopt_long's own messages, then
    qemu-nbd's pointer to its --help (the command here: ``PROG serve``)."""

    @staticmethod
    def hint():
        return f"Try `{prog()} serve --help' for more information."

    @classmethod
    def usage(cls, message):
        return UsageError(f"{message}\n{cls.hint()}")

    @classmethod
    def getopt(cls, kind, word, option):
        text = {"unrecognized": f"unrecognized option '{word}'",
                "invalid": f"invalid option -- '{option}'",
                "ambiguous": f"option '{word}' is ambiguous; possibilities:"
                             + "".join(f" '{name}'" for name in option),
                "no-argument": f"option '{option}' doesn't allow an argument",
                "missing": f"option '{option}' requires an argument" if len(option) > 1
                           else f"option requires an argument -- '{option}'"}[kind]
        return UsageError(f"{text}\n{prog()}: {cls.hint()}")


class Parser(argparse.ArgumentParser):
    """argparse with qemu-img's words for usage errors (``words``: qemu-nbd's
    for serve).  A subcommand's parser says what qemu-img says for too few
    and too many operands (:meth:`expects`); the too-many case reaches
    :meth:`extra_arguments` from the top-level parser, which is where
    argparse finds it."""

    too_few = too_many = None
    words = QemuImgWords

    def expects(self, too_few, too_many=None):
        """qemu-img's error_exit words for too few operands and for too
        many (``{}``: the first extra one; default: the too-few words)."""
        self.too_few, self.too_many = too_few, too_many or too_few

    def extra_arguments(self, command, extra):
        """The error for arguments left over after ``command``'s parse."""
        sub = subcommands(self).get(command)
        words = sub.words if sub is not None else self.words
        if extra[0].startswith("-") and extra[0] != "-":
            return words.getopt("unrecognized", extra[0], extra[0])
        if sub is not None and sub.too_many:
            return words.usage(sub.too_many.format(extra[0]))
        return UsageError(f"unrecognized arguments: {' '.join(extra)}")

    def error(self, message):
        if message.startswith("the following arguments are required") and self.too_few:
            raise self.words.usage(self.too_few)
        m = re.match(r"argument ([-\w]+)(?:/\S+)?: (?:invalid choice: (.*) \(choose|(expected))",
                     message)
        if m and m.group(3):                # getopt's "option requires an argument"
            option = m.group(1)
            raise self.words.getopt("missing", option, option[1:] if len(option) == 2 else option)
        if m and m.group(1) in CHOICE_ERRORS:
            import ast                      # (argparse shows the value as its repr)
            words, with_hint = CHOICE_ERRORS[m.group(1)]
            text = words.format(value=ast.literal_eval(m.group(2)))
            raise error_exit(text) if with_hint else UsageError(text)
        if message.startswith("unrecognized arguments: -"):
            raise self.words.getopt("unrecognized", message.split()[2], message.split()[2])
        command = self.prog.partition(" ")[2]
        raise UsageError(f"{command}: {message}" if command else message)


CACHE_OPTIONS = ("none", "off", "directsync", "writeback", "unsafe", "writethrough")


def source_cache(mode):
    """-T: the cache mode sources are read with (qemu's bdrv_parse_cache_mode
    names).  Checked as qemu-img checks it; qcow2fast reads sources through
    the page cache whatever the mode (as for convert)."""
    if mode not in CACHE_OPTIONS:
        raise UsageError(f"Invalid source cache option: {mode}")
    return mode


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


class OptionError(UsageError):
    """An option value qemu's QemuOpts refuse, in their words.  The command
    adds its context as qemu-img does: create puts the file's name before
    it, measure a line after it."""


def opt_size(text, key):
    """A size-typed ``-o`` option, as qemu's QemuOpts parse it (below 2^64)."""
    try:
        return strtosz(text)
    except (ValueError, OverflowError):
        raise OptionError(SIZE_HELP.format(key=key)) from None


def strtou64(text, lo=0, hi=2 ** 64 - 1):
    """qemu's qemu_strtou64 (and qemu_strtoi with a signed range): C's
    strtoull in base 0 (decimal, 0x hex, 0 octal) over the whole text; a
    minus sign wraps as in C.  ValueError if it is not such a number,
    OverflowError outside ``lo``..``hi``."""
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        raise ValueError(text)
    sign, digits = m.groups()
    value = int(digits, 16 if digits[1:2] in ("x", "X") else 8 if digits[0] == "0" else 10)
    if value >= 2 ** 64:
        raise OverflowError(text)
    if sign == "-":
        value = -value if lo < 0 else (-value) % 2 ** 64
    if not lo <= value <= hi:
        raise OverflowError(text)
    return value


def opt_number(text, key):
    """A number-typed ``-o`` option, as QemuOpts parse it (qemu_strtou64)."""
    try:
        return strtou64(text)
    except ValueError:
        raise OptionError(f"Parameter '{key}' expects a number") from None
    except OverflowError:
        raise OptionError(f"Value '{text}' is too large for parameter '{key}'") from None


def cvtnum(name, text, lo=0, hi=2 ** 63 - 1):
    """qemu-img's cvtnum_full: a size operand or option value (qemu_strtosz)
    between ``lo`` and ``hi``, with qemu-img's messages naming it ``name``."""
    try:
        value = strtosz(text)
    except ValueError:
        raise UsageError(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes "
                         f"for\n{prog()}: kilobytes, megabytes, gigabytes, terabytes, "
                         "petabytes and exabytes.") from None
    except OverflowError:
        value = None
    if value is None or not lo <= value <= hi:
        raise UsageError(f"Invalid {name} specified. Must be between {lo} and {hi}.")
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
            if value is None and key not in ("help", "?"):     # QemuOpts' bare flags
                key, value = (key[2:], "off") if key.startswith("no") else (key, "on")
            merged[key] = value
    return merged


def parse_bool(value, key):
    """A boolean option as qemu's qapi_bool_parse reads it (a bare key: on)."""
    if value is None or value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


def size_to_str(n):
    """qemu's size_to_str: three significant digits, binary units."""
    if n == 0:
        return "0 B"
    _, e = math.frexp(n / (1000.0 / 1024.0))
    i = max(0, (e - 1) // 10)
    i = min(i, 6)
    unit = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][i]
    return f"{n / (1 << (10 * i)):0.3g} {unit}B"
