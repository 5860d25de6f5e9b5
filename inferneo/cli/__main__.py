"""``python -m inferneo.cli ...``: the same as the ``inferneo`` command."""

import sys

from inferneo.cli.main import main

sys.exit(main())
