"""`python -m infopo_cli` is the same as the `infopo` command."""

from infopo_cli.cli import main

main()
