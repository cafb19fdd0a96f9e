"""``decentsim bench NAME``: each module exposes ``add_arguments(parser)`` and
``run(args) -> dict``, printed as one JSON line."""
