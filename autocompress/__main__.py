"""``python -m autocompress``: the same command line as the ``autocompress`` script."""

import sys

from autocompress.cli import main

sys.exit(main())
