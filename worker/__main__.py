"""`python -m worker` is `convq worker`."""

import sys

from .runner import main

sys.exit(main())
