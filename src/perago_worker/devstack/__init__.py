"""Real lakeFS and Conductor servers as local processes, for development, the demo and tests."""
