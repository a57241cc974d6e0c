"""``python -m shoplens``: the same command tree as the ``shoplens`` console script."""
from shoplens.cli import main

raise SystemExit(main())
