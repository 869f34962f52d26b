"""`python -m erc <command>`: the same as the `erc` console script."""

import sys

from erc.cli import main

sys.exit(main())
