"""getopt's argument order for argparse: qemu-img, like every getopt
program, takes a subcommand's options anywhere among its operands
(``create -f qcow2 -b BASE IMG -F qcow2 6G``), and ``--`` ends the options.

:func:`options_first` permutes the command line as GNU getopt does before
argparse sees it: the subcommand's options (each value joined to its
option, so a value that starts with ``-`` stays a value) first, then its
operands in their order, after a ``--`` when one of them starts with ``-``.
"""

import argparse


def subcommands(parser):
    """A parser's subcommand parsers by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _value(option, joiner, value):
    """An option and its value: joined when the value starts with ``-``
    (argparse would take it for an option), else as two arguments."""
    return [option + joiner + value] if value.startswith("-") else [option, value]


def _long_option(parser, word):
    """The long option a ``--name[=value]`` word names, as getopt_long
    finds it: the exact name, else the one option the name begins (an
    abbreviation); -> (action, full name)."""
    name = word.partition("=")[0]
    actions = parser._option_string_actions
    if name in actions:
        return actions[name], name
    found = {}                          # action -> its first long name the word begins
    for option, action in actions.items():
        if option.startswith("--") and option.startswith(name):
            found.setdefault(action, option)
    if not found:
        raise parser.words.getopt("unrecognized", word, name)
    if len(found) > 1:
        raise parser.words.getopt("ambiguous", word, list(found.values()))
    return found.popitem()


def _short_option(parser, word, letter):
    action = parser._option_string_actions.get("-" + letter)
    if action is None:
        raise parser.words.getopt("invalid", word, letter)
    return action


def _permute(parser, args):
    options, operands = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
        elif arg.startswith("--"):
            # Given to argparse by its full name, its value joined (a value
            # that starts with "-" stays a value).
            action, name = _long_option(parser, arg)
            given = arg.partition("=")
            if action.nargs == 0:
                if given[1]:
                    raise parser.words.getopt("no-argument", arg, name)
                options.append(name)
            elif given[1]:
                options.append(f"{name}={given[2]}")
            elif i == len(args):
                raise parser.words.getopt("missing", arg, name)
            else:
                options.append(f"{name}={args[i]}")
                i += 1
        else:
            # A cluster of short options (-pq, -fqcow2): the first that takes
            # a value takes the rest of the word, or else the next argument.
            # (An unknown letter is refused here, as getopt does, where
            # argparse would take "-1" for a negative number operand.)
            words = [arg]
            for j in range(1, len(arg)):
                if _short_option(parser, arg, arg[j]).nargs != 0:
                    if j == len(arg) - 1:
                        if i == len(args):
                            raise parser.words.getopt("missing", arg, arg[j])
                        words = _value(arg, "", args[i])
                        i += 1
                    break
            options += words
    if any(op.startswith("-") and op != "-" for op in operands):
        operands.insert(0, "--")
    return options + operands


def options_first(parser, argv):
    """``argv`` with the subcommand's options before its operands."""
    commands = subcommands(parser)
    for i, arg in enumerate(argv):
        if arg == "--" or not arg.startswith("-"):
            sub = commands.get(arg)
            if sub is None:
                return argv
            return argv[:i + 1] + _permute(sub, argv[i + 1:])
    return argv
