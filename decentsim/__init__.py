"""decentsim command line."""
