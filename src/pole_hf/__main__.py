"""`python -m pole_hf` runs the `pole-hf` command line."""

import sys

from .cli import main

sys.exit(main())
