"""`python -m services.decider`: the same as `ensemble decider`."""

import sys

from ensemble_core.runner import run_service
from services.decider.service import run

sys.exit(run_service("decider", run))
