"""One module per CLI command (HELP, add_arguments, run)."""
