"""``python -m gateway``: the same as the ``mailgate`` console script."""

from gateway.cli import main

main()
