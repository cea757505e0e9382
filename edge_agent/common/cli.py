"""The command-line scaffold that ``edge-agent`` and ``edge-hub`` share.

A program is a name, a version, a package of verb modules and its error base class. A verb
module is the verb: its name (``validate_config`` is ``validate-config``), its docstring (the
first line is the one-line help in the verb list, the rest the description ``--help`` shows),
``arguments(parser)`` adding its options, and ``run(args)`` returning the exit status. A module
may instead build its parser itself with ``register(subparsers)`` (``add_verb``; ``add_group``
for a verb made of actions). Modules are imported when the parser is built, and keep heavy
imports (onnxruntime, OpenCV, aiohttp) inside the verb, so ``--help`` stays fast. ``main`` runs
the chosen verb and turns an error the program raised on purpose into its exit code and
``PROG: error: ...`` lines on stderr, never a traceback: one line per field for a config error
(``settings.ConfigError``: ``field: message (got value)``), one line for any other.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from edge_agent.common import settings

#: What a verb runs: the parsed arguments in, the exit status out.
VerbFunc = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Program:
    """One command-line program."""

    #: The command's name, e.g. ``edge-agent`` (``--version`` and error lines start with it).
    prog: str
    description: str
    version: str
    #: The package holding the verb modules, e.g. ``edge_agent.commands``.
    commands: str
    #: Verb module names in that package, in the order ``--help`` lists them.
    verbs: tuple[str, ...]
    #: Base of the errors the program raises on purpose; each has an ``exit_code``.
    error: type[Exception]


def add_verb(sub: Any, name: str, func: VerbFunc | None, *, help: str,
             description: str | None = None) -> argparse.ArgumentParser:
    """Add verb ``name`` to ``sub`` (a ``register`` argument); ``func`` runs it (None: the
    verb has actions of its own, each with its ``func``). ``help`` is its line in the
    program's ``--help``; ``description`` heads its own (default: ``func``'s docstring)."""
    if description is None and func is not None:
        description = inspect.getdoc(func)
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def add_group(sub: Any, name: str, *, help: str, description: str) -> Any:
    """Add verb ``name`` made of actions (``edge-hub models push``); add each action to the
    returned subparsers with ``add_verb``."""
    parser = add_verb(sub, name, None, help=help, description=description)
    return parser.add_subparsers(dest="action", metavar="ACTION", required=True)


class _Paragraphs(argparse.HelpFormatter):
    """Wraps each paragraph of a description to the terminal, keeping the breaks between them."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join(fill(p, width, indent) for p in text.split("\n\n"))


def _add_module_verb(sub: Any, name: str, module: ModuleType) -> None:
    if hasattr(module, "register"):  # it builds its parser itself
        module.register(sub)
        return
    summary, _, description = inspect.cleandoc(module.__doc__ or name).partition("\n")
    parser = add_verb(sub, name.replace("_", "-"), getattr(module, "run", None), help=summary,
                      description=description.strip() or summary)
    parser.formatter_class = _Paragraphs
    if hasattr(module, "arguments"):
        module.arguments(parser)


def build_parser(program: Program) -> argparse.ArgumentParser:
    """The argument parser with every verb added."""
    parser = argparse.ArgumentParser(prog=program.prog, description=program.description)
    parser.add_argument("--version", action="version",
                        version=f"{program.prog} {program.version}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for name in program.verbs:
        _add_module_verb(sub, name, importlib.import_module(f"{program.commands}.{name}"))
    _add_completion(sub, program)
    return parser


def error_lines(prog: str, exc: BaseException) -> list[str]:
    """What ``main`` prints for ``exc``: a line per config field, else one line."""
    if isinstance(exc, settings.ConfigError):
        return [f"{prog}: error: {settings.describe(e)}" for e in exc.errors]
    return [f"{prog}: error: {exc}"]


#: The shells ``PROG completion SHELL`` writes a script for.
SHELLS = ("bash", "zsh", "fish")


def _add_completion(sub: Any, program: Program) -> None:
    def run(args: argparse.Namespace) -> int:
        # only this verb and a completing shell need argcomplete
        from argcomplete.shell_integration import shellcode  # noqa: PLC0415

        sys.stdout.write(shellcode([program.prog], shell=args.shell))
        return 0

    p = add_verb(sub, "completion", run, help="print the shell completion script",
                 description=f"Print a script that completes {program.prog}'s verbs and "
                 f"flags in SHELL. Load it once per shell, e.g. in ~/.bashrc: "
                 f'eval "$({program.prog} completion bash)"; or install it: '
                 f"{program.prog} completion bash > /etc/bash_completion.d/{program.prog}")
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help=f"one of {', '.join(SHELLS)}")


def main(program: Program, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the verb, return its exit status (errors: their ``exit_code``).

    Under a completing shell (the script ``PROG completion SHELL`` prints sets
    ``_ARGCOMPLETE``) it prints the completions of the command line instead and exits.
    """
    parser = build_parser(program)
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete  # noqa: PLC0415

        argcomplete.autocomplete(parser)  # exits when it completed something
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except program.error as exc:
        sys.stderr.writelines(line + "\n" for line in error_lines(program.prog, exc))
        return int(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        return 130
    return rc
