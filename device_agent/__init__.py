"""decentsim: device_agent package."""
