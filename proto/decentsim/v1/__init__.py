"""Wire protocol v1 (package ``decentsim.v1``): ``.proto`` sources and generated code."""
