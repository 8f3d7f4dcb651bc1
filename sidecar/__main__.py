"""`python -m sidecar`: the same as `ensemble sidecar`."""

import sys

from sidecar.cli import main

sys.exit(main())
