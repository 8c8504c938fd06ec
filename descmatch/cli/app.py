"""The Typer app, its consoles and logging, progress drawing, and the console entry point
that maps DescmatchError to one line on stderr and the error's exit code."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .. import __version__
from ..errors import DescmatchError

app = typer.Typer(
    name="descmatch",
    help="Local feature extraction and matching with learned patch descriptors.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped output is not squeezed into 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
_state: dict[str, Any] = {"quiet": False, "sigterm": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"descmatch {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    from ..distributed import launch_env

    env = launch_env()
    # Under torchrun only rank 0 draws progress and prints summaries (errors still show).
    _state["quiet"] = quiet or (env is not None and env[0] != 0)
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # piped or to a file: plain lines, no padding to the console's width
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=level, force=True, handlers=[handler])


def _bar(*columns: Any) -> Progress | None:
    if _state["quiet"] or not err.is_terminal:  # no bar (nor its blank line) in a pipe
        return None
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *columns,
        TextColumn("{task.fields[name]}"),
        console=err,
        transient=True,
    )


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress callback ``(i, n, name)`` drawn as a bar on a terminal's stderr; it stops
    the command (KeyboardInterrupt) once a SIGTERM has arrived."""
    bar = _bar(TimeRemainingColumn())
    if bar is None:
        yield lambda i, n, name: _stop_if_terminated()
        return
    task = bar.add_task(label, total=None, name="")
    with bar:

        def update(i: int, n: int, name: str) -> None:
            _stop_if_terminated()
            bar.update(task, completed=i, total=n, name=name[-40:])

        yield update


@contextmanager
def stage_progress(label: str) -> Iterator[Callable[[str, int, int, str], None]]:
    """A progress callback ``(stage, i, n, name)`` for multi-stage commands (sfm), as
    :func:`progress`."""
    bar = _bar()
    if bar is None:
        yield lambda stage, i, n, name: _stop_if_terminated()
        return
    task = bar.add_task(label, total=None, name="")
    with bar:

        def update(stage: str, i: int, n: int, name: str) -> None:
            _stop_if_terminated()
            bar.update(task, description=stage, completed=i, total=n, name=name[-40:])

        yield update


def say(msg: str) -> None:
    """A result line on stdout (not under --quiet)."""
    if not _state["quiet"]:
        out.print(msg, highlight=False, soft_wrap=True, markup=False)


def torch_device(spec: str) -> Any:
    from ..device import resolve_device

    return resolve_device(spec)


def _sigterm(signum: int, frame: object) -> None:
    # Remembered as well as raised: a KeyboardInterrupt raised while Python runs a finalizer
    # or a weakref callback is printed and dropped, and the command would go on and exit 0.
    _state["sigterm"] = True
    raise KeyboardInterrupt


def _stop_if_terminated() -> None:
    """Raise the KeyboardInterrupt of a SIGTERM that was dropped (see :func:`_sigterm`)."""
    if _state["sigterm"]:
        raise KeyboardInterrupt


def _interrupted() -> None:
    err.print(
        "interrupted: finished work is saved; run the same command to resume",
        highlight=False,
        markup=False,
    )
    sys.exit(130)


_GLOBAL_FLAGS = ("--quiet", "-q", "--verbose", "-v")


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """Accept --quiet/--verbose after the command too (descmatch extract ... --quiet)."""
    if "--" in argv:
        return argv
    flags = [a for a in argv if a in _GLOBAL_FLAGS]
    return flags + [a for a in argv if a not in _GLOBAL_FLAGS]


def main() -> None:
    """The console entry point."""
    _state["sigterm"] = False
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        rv = app(args=_hoist_global_flags(sys.argv[1:]), standalone_mode=False)
    except DescmatchError as e:
        err.print(Text("error: ", style="red") + Text(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _interrupted()
    except Exception as e:
        # Usage errors (click's exceptions, bundled by typer) know how to show themselves.
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
    if rv == 130 or _state["sigterm"]:  # typer turns KeyboardInterrupt into 130
        _interrupted()
    if isinstance(rv, int) and rv:
        sys.exit(rv)
