"""``python -m memforge`` runs the command-line interface."""

from memforge.cli import main

raise SystemExit(main())
