"""The only package that writes SQL. Dialect differences are answered by `dialect.capabilities`."""
