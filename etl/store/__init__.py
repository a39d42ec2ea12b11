"""The only package that writes SQL. Dialect differences live in `engine`."""
