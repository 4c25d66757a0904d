"""``python -m dynalora``: the same command as ``dynalora``."""

import sys

from dynalora.cli import main

sys.exit(main())
