"""`romscale adapters ...` commands (thin: parse, call the library, print)."""

import typer

app = typer.Typer(help="Adapter libraries: inspect, merge, HydraOpt, report.", no_args_is_help=True)
