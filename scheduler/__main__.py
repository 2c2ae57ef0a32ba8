"""``python -m scheduler`` runs the readar command line."""

from scheduler.cli import main

main()
