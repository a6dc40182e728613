"""`python -m zotune ...` (as `torchrun -m zotune train ...` runs it): the command line."""

import sys

from .cli import main

sys.exit(main())
