"""`python -m services.creator`: the same as `ensemble creator`."""

import sys

from ensemble_core.runner import run_service
from services.creator.service import run

sys.exit(run_service("creator", run))
