"""`f2m-ray`: the command line. Thin: it parses, validates and calls f2m_ray.

Every user error (``F2MError``, a bad path, a refused permission) becomes one
line on stderr and exit status 1; click's own usage errors exit 2.
"""

from __future__ import annotations

import click

from f2m_ray import __version__
from f2m_ray.errors import F2MError, first_line
from f2m_ray.runtime.stop import stop_line, stop_on_signals


class F2MGroup(click.Group):
    """A click group that turns library errors into one clean line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM from a scheduler (f2m_ray.runtime.stop)
            line, status = stop_line(err)
            click.echo(line, err=True)
            ctx.exit(status)
        except F2MError as err:
            raise click.ClickException(str(err)) from None
        except (OSError, ValueError) as err:
            raise click.ClickException(_describe(err)) from None


def command_again(add: str | None = None, drop: tuple[str, ...] = ()) -> str:
    """This command line as typed (quoted for a shell), with `drop` flags left out and `add` added once."""
    import shlex
    import sys

    args = [a for a in sys.argv[1:] if a not in drop]
    if add and add not in args:
        args.append(add)
    return shlex.join(["f2m-ray", *args])


def _describe(err: Exception) -> str:
    if isinstance(err, OSError) and err.filename:
        reason = err.strerror or type(err).__name__
        return f"{reason}: {err.filename}"
    return first_line(err)


@click.group(cls=F2MGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="f2m-ray")
def cli() -> None:
    """Feature2Mass on Ray: train a conditional GAN on labeled breast-mass ROIs and
    synthesize large, correctly labeled datasets as Parquet shards."""


def _register() -> None:
    # Each sub-command lives in its own module; importing it registers it on `cli`.
    from f2m_ray_cli import commands  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    from f2m_ray.runtime.console import own_console

    own_console()
    stop_on_signals()
    _register()
    cli.main(args=argv, prog_name="f2m-ray", standalone_mode=True)

