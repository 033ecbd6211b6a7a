"""CLI entry points and named configs."""
