"""``python -m lbgw``: the same as the ``lbgw`` command."""

import sys

from lbgw.cli import main

sys.exit(main())
