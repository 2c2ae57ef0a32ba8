"""SQL records and object storage for READAR runs."""
