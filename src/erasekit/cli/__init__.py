"""``erasekit``: a thin command line over the Python API, one module per command group.

This module only builds the app: every command is a function of its group's module, registered
here with the one error handler (:class:`erasekit.cli.common.App`: a library error becomes one line
on stderr and exit code 2).
"""

from __future__ import annotations

import sys

from erasekit.cli import analyze, attack, demo, erase, evaluate, export, generate, report, serve, study, world
from erasekit.cli.common import App

app = App(help="Erase, hide, recover and audit concepts in text-to-image diffusion models.", no_args_is_help=True)
app.command()(erase.methods)
app.command()(erase.erase)
app.command("report")(report.report_cmd)
app.command()(generate.generate)
app.command()(evaluate.evaluate)
app.command()(demo.demo)
app.command()(attack.attack)
app.command()(erase.recover)
app.command("export")(export.export_cmd)
app.command()(serve.serve)
app.add_typer(world.app, name="world")
app.add_typer(analyze.app, name="analyze")
app.add_typer(study.app, name="study")


def main() -> None:  # pragma: no cover
    app(prog_name="erasekit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
