"""``python -m trainkit`` is the same as the ``trainkit`` console script."""

import sys

from trainkit.cli import main

sys.exit(main())
