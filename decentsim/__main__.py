"""``python -m decentsim`` is the ``decentsim`` command."""

import sys

from decentsim.cli import main

sys.exit(main())
