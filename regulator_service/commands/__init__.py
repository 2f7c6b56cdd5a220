"""The ``regulator`` subcommands, one module each."""
