"""`mhsft eval`."""
