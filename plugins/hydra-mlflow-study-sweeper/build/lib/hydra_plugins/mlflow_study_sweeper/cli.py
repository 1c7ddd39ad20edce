"""Command-line help for apps that use the sweeper: search spaces under hydra.sweeper.params.

Imported by Hydra's plugin scan: standard library only.
"""

from __future__ import annotations


def quote_search_space_args(argv: list[str]) -> list[str]:
    """Quote `hydra.sweeper.params.KEY=interval(...)` so Hydra keeps it as text for the sweeper.

    Hydra refuses sweep syntax inside its own config ("Sweeping over Hydra's configuration is
    not supported") before any sweeper runs; quoted, the expression reaches the sweeper as the
    string it parses. `++` because the dotted key nests (params.model.lr) beside a config's flat
    'model.lr' key; the sweeper lets the command line's entry win. Call it on sys.argv[1:]
    before Hydra parses it; `KEY=interval(...)` (without the prefix) needs none of this.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+").startswith("hydra.sweeper.params.") and value[:1] not in "'\"":
            quote = '"' if "'" in value else "'"
            arg = f"++{key.lstrip('+')}={quote}{value}{quote}"
        out.append(arg)
    return out
