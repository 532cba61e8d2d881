"""The recipe: its schema, what a variant's `quant` may say, and loading YAML with one line per problem."""
