"""``python -m memflow_apps.cli`` (e.g. under ``torchrun``): the ``memflow`` command."""

import sys

from memflow_apps.cli.main import main

if __name__ == "__main__":  # not when pkgutil.walk_packages imports it
    sys.exit(main())
