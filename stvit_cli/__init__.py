"""The ``stvit`` command line: thin wrappers that parse, call :mod:`stvit_core` and print."""
