"""`python -m sparseprune ...` runs the same command line as the `sparseprune` script."""
from sparseprune.cli import main

raise SystemExit(main())
