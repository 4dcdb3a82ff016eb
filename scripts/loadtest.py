"""The load test's entry: `.venv/bin/python scripts/loadtest.py --help`. The code is the
package beside this file, scripts/loadtest/ (run from here, scripts/ is the first import
path, and a package wins over a module of the same name)."""

from loadtest.cli import main

main()
