"""`python -m autoglm ...` is the `autoglm` command."""

from autoglm.cli import main

raise SystemExit(main())
