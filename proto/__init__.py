"""decentsim: proto package."""
