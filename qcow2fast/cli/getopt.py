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


def _takes_value(parser, option):
    """Whether ``option`` (as typed, maybe a unique prefix of a long
    option, as getopt_long accepts) takes a value; None if unknown."""
    actions = parser._option_string_actions
    action = actions.get(option)
    if action is None and option.startswith("--"):
        matches = {a for name, a in actions.items() if name.startswith(option)}
        action = matches.pop() if len(matches) == 1 else None
    if action is None:
        return None
    return action.nargs != 0


def _value(option, joiner, value):
    """An option and its value: joined when the value starts with ``-``
    (argparse would take it for an option), else as two arguments."""
    return [option + joiner + value] if value.startswith("-") else [option, value]


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
            if "=" not in arg and _takes_value(parser, arg):
                if i == len(args):
                    raise _usage(f"missing argument for option '{arg}'")
                options += _value(arg, "=", args[i])
                i += 1
            else:
                options.append(arg)
        else:
            # A cluster of short options (-pq, -fqcow2): the first that takes
            # a value takes the rest of the word, or else the next argument.
            # (An unknown letter is refused here, as getopt does, where
            # argparse would take "-1" for a negative number operand.)
            words = [arg]
            for j in range(1, len(arg)):
                takes = _takes_value(parser, "-" + arg[j])
                if takes is None:
                    raise _usage(f"unrecognized option '{arg}'")
                if takes:
                    if j == len(arg) - 1:
                        if i == len(args):
                            raise _usage(f"missing argument for option '{arg}'")
                        words = _value(arg, "", args[i])
                        i += 1
                    break
            options += words
    if any(op.startswith("-") and op != "-" for op in operands):
        operands.insert(0, "--")
    return options + operands


def _usage(message):
    from .options import error_exit     # (options imports this module)
    return error_exit(message)


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
