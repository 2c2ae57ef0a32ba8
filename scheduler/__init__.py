"""READAR: the control plane (dataset index, planning, runs, the readar command line, settings)."""
