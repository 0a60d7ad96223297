"""`python -m worker` is `invoice-relay`."""

import sys

from worker.cli import main

sys.exit(main())
