"""``python -m changefeed`` runs the command line."""

from changefeed.cli import main

main()
