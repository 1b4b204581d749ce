"""The ``edgert`` command line; the app lives in :mod:`edgert.cli.app`."""
