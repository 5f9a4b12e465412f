"""Notice new files in the intake folder, decide when each is complete, run the service."""
