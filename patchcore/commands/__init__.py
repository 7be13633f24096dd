"""The `patchcore` commands by group, each a thin shell over the package that does the work; patchcore/cli.py
assembles them and imports a module only when one of its commands runs (or help lists it).

Modules that need the scorer (bank, evaluate, scoring) import it at the top: their options are derived from
its settings dataclasses. The others (registry, stream, ops, console) stay torch-free, so `patchcore status`,
`ingest`, `store` and `console` start without loading torch."""
