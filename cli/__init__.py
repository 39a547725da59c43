"""The ``kdcache`` command line: thin typer wrappers around :mod:`kdcache`."""
