"""The four services of the Ensemble Operator. Each is ``async def run(settings)``; none imports another."""
