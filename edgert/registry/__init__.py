"""Operator side of signed model delivery: a TUF repository managed by ``edgert registry``.

:mod:`edgert.registry.keys` holds the signing keys, :mod:`edgert.registry.repository`
the metadata workflow (init, add, promote, publish, rotate-keys, status; its docstring
maps the modules each step lives in), :mod:`edgert.registry.hub` the upload to a Hugging Face Hub repo.
"""
