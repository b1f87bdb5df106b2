"""``python -m fxsurgeon.cli``: the ``fxsurgeon`` command."""

import sys

from .app import main

sys.exit(main())
