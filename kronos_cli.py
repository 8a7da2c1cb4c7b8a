"""The `kronos-worker` command's entry point (the command itself is tasks/cli.py).

Kept as a top-level module because pyproject.toml's script and existing installs name `kronos_cli:main`.
"""

import sys

from tasks.cli import main

if __name__ == "__main__":
    sys.exit(main())
