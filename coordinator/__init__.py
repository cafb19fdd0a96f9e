"""decentsim: coordinator package."""
