"""Command-line utilities that inspect a config without running it."""
