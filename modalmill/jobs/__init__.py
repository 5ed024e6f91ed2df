"""Job specs (YAML), their runner, and the built-in jobs (the demo)."""
