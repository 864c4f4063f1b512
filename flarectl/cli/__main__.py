"""``python -m flarectl.cli``: the same entry point as the ``flarectl`` script."""

from flarectl.cli import main

main()
