"""``python -m regulator_cli``: the same as the ``regulator`` command."""

import sys

from .main import main

sys.exit(main())
