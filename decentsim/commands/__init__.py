"""One module per ``decentsim`` command: ``add_arguments(parser)`` and ``run(args) -> int``."""
