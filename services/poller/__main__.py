"""`python -m services.poller`: the same as `ensemble poller`."""

import sys

from ensemble_core.runner import run_service
from services.poller.service import run

sys.exit(run_service("poller", run))
