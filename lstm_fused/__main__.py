"""`python -m lstm_fused`: see lstm_fused.cli."""

from .cli import main

raise SystemExit(main())
