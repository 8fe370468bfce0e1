"""`python -m eval.listen`: see eval.listen.cli."""

from eval.listen.cli import main

raise SystemExit(main())
