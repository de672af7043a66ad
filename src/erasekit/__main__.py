"""`python -m erasekit` runs the CLI."""

from erasekit.cli import main

main()
