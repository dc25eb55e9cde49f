"""What every `romscale <area> <verb>` command shares: the error contract, the common options and
their checks. Imports nothing heavy: `romscale --help` must start fast.

Error contract: a bad input or option prints one line `error: ...` on stderr naming the file or
option and what was expected, and exits with code 2, never with a traceback (`main` enforces it for
errors raised anywhere, including typer's own usage errors).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, NoReturn, Optional

import typer

from romscale.errors import RomscaleError

# The same meaning everywhere (DEVELOPERS.md, "One grammar").
OUT_HELP = "output folder (a new folder, or a romscale output of the same kind with --overwrite)"
JSON_HELP = "also write the results as JSON to this file"
OVERWRITE_HELP = "replace an existing output that romscale wrote (never anything else, never an input)"
SEED_HELP = "random seed"


def out_option(default: Any = ..., help: str = OUT_HELP) -> Any:
    return typer.Option(default, "--out", "-o", help=help)


def json_option() -> Any:
    return typer.Option(None, "--json", help=JSON_HELP, metavar="PATH")


def overwrite_option() -> Any:
    return typer.Option(False, "--overwrite", help=OVERWRITE_HELP)


def seed_option(default: int = 0) -> Any:
    return typer.Option(default, "--seed", help=SEED_HELP)


class UsageError(RomscaleError):
    """A bad option value, found before any expensive work."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one `error:` line on stderr and exit."""
    one_line = " ".join(str(message).split())
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def choice(option: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def at_least(option: str, value: float, low: float, *, strict: bool = False) -> float:
    bad = value <= low if strict else value < low
    if bad or value != value:  # NaN compares false with everything
        raise UsageError(f"{option} must be {'>' if strict else '>='} {low:g}; got {value!r}")
    return value


def in_range(option: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise UsageError(f"{option} must be in {'(' if low_open else '['}{low:g}, {high:g}]; got {value!r}")
    return value


def existing_dir(option: str, path: Path, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{option} {path}: does not exist; expected {what}")
    if not path.is_dir():
        raise UsageError(f"{option} {path}: is not a folder; expected {what}")
    return path


def check_output(option: str, target: Optional[Path], *, kind: str, inputs: Iterable[Path] = (), overwrite: bool = False,
                 is_file: bool = False) -> None:
    """Refuse an output target before any work (the writer checks again, under its lock)."""
    if target is None:
        return
    from romscale.utils.outputs import check_target

    check_target(target, kind=kind, inputs=list(inputs), overwrite=overwrite, what=option, is_file=is_file)


def write_json(path: Optional[Path], obj: dict[str, Any], *, inputs: Iterable[Path] = (), overwrite: bool = False,
               kind: str = "report") -> None:
    """`--json PATH`: write `obj` with the command line that produced it, under the output rules."""
    if path is None:
        return
    from romscale.utils.outputs import write_json_output

    write_json_output(path, {"command": "romscale " + " ".join(sys.argv[1:]), **obj}, kind=kind, inputs=inputs,
                      overwrite=overwrite, what="--json")
    print(f"wrote {path}", file=sys.stderr)


def main(app: typer.Typer, argv: Optional[list[str]] = None) -> None:
    """Run `app` under the error contract."""
    try:  # typer >= 0.20 carries its own copy of click
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - older typer on the real click
        from click import exceptions as click  # type: ignore[no-redef]
    no_args = getattr(click, "NoArgsIsHelpError", ())

    try:
        rc = app(args=argv, standalone_mode=False, prog_name="romscale")
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        fail("interrupted", code=130)
    except no_args as exc:  # `romscale bundle` alone: show the area's help
        if exc.ctx is not None:
            print(exc.ctx.get_help())
        raise SystemExit(0) from None
    except click.UsageError as exc:
        option = ""
        param = getattr(exc, "param", None)
        if param is not None and getattr(param, "opts", None):
            option = f"{param.opts[0]}: "
        msg = exc.format_message()
        fail(msg if not option or param.opts[0] in msg else option + msg)
    except click.ClickException as exc:
        fail(exc.format_message())
    except RomscaleError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except OSError as exc:  # a file the user named could not be read or written
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        fail(f"{where}{exc.strerror or exc}")
    except Exception as exc:  # a defect in romscale, not the user's fault: still no traceback by default
        if os.environ.get("ROMSCALE_DEBUG"):
            raise
        fail(f"internal error ({type(exc).__name__}: {exc}); please report it (ROMSCALE_DEBUG=1 shows the traceback)", code=1)
    if isinstance(rc, int) and rc:
        raise SystemExit(rc)
