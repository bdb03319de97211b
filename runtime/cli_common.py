"""What every mdx command shares: errors a user can cause become one line on stderr and an
exit code, never a traceback. (mdx.train, mdx.export and the benchmarks import it too; it needs
nothing beyond click.)"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Union

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

ErrorTypes = Union[tuple[type[BaseException], ...], Callable[[], tuple[type[BaseException], ...]]]


def fail(prog: str, message: str, code: int = 2, *, one_line: bool = True) -> NoReturn:
    """Print `prog: error: message` to stderr and exit with `code`."""
    text = " ".join(str(message).split()) if one_line else str(message)
    click.echo(f"{prog}: error: {text}", err=True)
    sys.exit(code)


def one_line_command(prog: str, user_errors: ErrorTypes = (), interrupted: str = "interrupted",
                     failures: ErrorTypes = ()) -> type[click.Command]:
    """A click.Command class whose usage errors, Ctrl-C and `user_errors` end in one line.

    `user_errors` is a tuple of exception types or a function returning one (for modules that
    import them lazily). `failures` (same form) are errors of the tools rather than of the user,
    e.g. a model that fails validation: `prog: error: ` and the message, whose further lines
    (a table of numbers) are indented below it. Exit codes: 2 for user errors, 1 for failures,
    130 for an interrupt.
    """

    class OneLineErrors(click.Command):
        def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
            errors = user_errors() if callable(user_errors) else tuple(user_errors)
            failed = failures() if callable(failures) else tuple(failures)
            try:
                rv = super().main(args=args, prog_name=prog_name or prog, complete_var=complete_var,
                                  standalone_mode=False, **extra)
            except (click.exceptions.Abort, KeyboardInterrupt):
                fail(prog, interrupted, 130)
            except click.ClickException as e:
                fail(prog, e.format_message())
            except errors as e:
                fail(prog, str(e))
            except failed as e:
                first, *rest = str(e).splitlines() or [type(e).__name__]
                fail(prog, first + "".join(f"\n    {line}" for line in rest), 1, one_line=False)
            code = rv if isinstance(rv, int) else 0
            if standalone_mode:
                sys.exit(code)
            return code

    return OneLineErrors
