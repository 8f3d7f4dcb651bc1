"""creator: turns an Ensemble into running members and announces them (member records and events)."""
