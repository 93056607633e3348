"""``python -m emotune.search [key=value ...]``: run or resume a search (see :mod:`emotune.search.driver`)."""

import sys

from emotune.search.driver import main

sys.exit(main())
