"""``python -m edgert`` is the ``edgert`` command."""

from edgert.cli.app import main

main()
