"""The `kiln` command line: one module per group of commands, what they share, and the one-line failures."""
