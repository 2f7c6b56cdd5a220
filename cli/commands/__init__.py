"""The ``regulator`` subcommands, one module each (``serve`` lives with the server)."""
