"""`python -m services.actuator`: the same as `ensemble actuator`."""

import sys

from ensemble_core.runner import run_service
from services.actuator.service import run

sys.exit(run_service("actuator", run))
