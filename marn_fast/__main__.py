"""`python -m marn_fast` = the `marn-fast` command line."""
from .cli import main

raise SystemExit(main())
