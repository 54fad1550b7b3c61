"""`python -m gannet` runs the command line."""

from gannet.cli import main

raise SystemExit(main())
