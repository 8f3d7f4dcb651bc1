"""`python -m ensemble_cli`: the same as the `ensemble` command."""

import sys

from ensemble_cli.main import main

sys.exit(main())
