"""Sub-commands of the readar command line, one module each."""
