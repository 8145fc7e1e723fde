"""Code both sides of the fleet import: schemas, error codes, configuration, broker wiring."""
