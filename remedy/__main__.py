"""Allow ``python -m remedy``."""

from __future__ import annotations

from remedy.cli import main

raise SystemExit(main())
