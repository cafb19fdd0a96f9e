"""decentsim: protocols package."""
