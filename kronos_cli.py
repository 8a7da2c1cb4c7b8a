"""The `kronos-worker` command's entry point (the command itself is tasks/cli.py).

Importing `tasks` reads and checks every KRONOS_* variable (tasks/app.py), so a bad one raises while
tasks/cli.py is still being imported, before any of its code can catch it. Caught here, outside the package,
it is one line naming the variable, like every other error of the command, instead of a traceback.
"""

import sys

EXIT_USAGE = 2  # as tasks/cli.py's EXIT_USAGE: the command was given something it cannot use


def main() -> int:
    try:
        from tasks.cli import main as run
    except Exception as exc:
        # Imported by tasks/app.py before it checks the variables, whichever of them is bad.
        settings = sys.modules.get("tasks.settings")
        if settings is None or not isinstance(exc, settings.SettingsError):
            raise
        print(f"kronos-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run()


if __name__ == "__main__":
    sys.exit(main())
