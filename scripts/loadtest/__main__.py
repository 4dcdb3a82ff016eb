"""`python -m scripts.loadtest` from the repository root; `scripts/loadtest.py` does the same."""

from .cli import main

main()
