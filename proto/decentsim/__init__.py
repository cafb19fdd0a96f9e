"""Package ``decentsim``: generated wire-protocol code lives under ``decentsim.v1``."""
