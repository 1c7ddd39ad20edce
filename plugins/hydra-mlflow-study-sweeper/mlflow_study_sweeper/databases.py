"""New SQLite stores (Optuna's and MLflow's) appear whole, and in a fraction of a second.

Both libraries create a new database's tables in many steps (MLflow: dozens of migrations,
seconds): a process killed among them leaves a file that every later start fails on. A new
store is therefore made under a temporary name and linked into place when whole. The first
empty store a library version makes on a machine is kept under ~/.cache/mlflow-study-sweeper,
and later new stores start as its copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlflow-study-sweeper"


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for another URL, or an in-memory database)."""
    if not url.startswith("sqlite:///") or ":memory:" in url:
        return None
    return Path(url[len("sqlite:///") :].split("?", 1)[0])


def create_whole(
    path: Path, name: str, build: Callable[[Path], None], ready: Callable[[Path], None]
):
    """Make the store at `path` if it is missing: from the cached empty store `name` (made by
    `build(file)` the first time), finished by `ready(file)` (the library opens it), then
    linked into place. Another process that was first wins; its store is used."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f".{path.name}.creating-*"):  # a killed attempt's leftovers
        pid = left.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            left.unlink(missing_ok=True)
    building = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        template = cached_empty(name, build)
        if template is not None:
            shutil.copyfile(template, building)
        ready(building)
        with contextlib.suppress(FileExistsError):  # another worker was first: use its store
            os.link(building, path)
    finally:
        building.unlink(missing_ok=True)


def cached_empty(name: str, build: Callable[[Path], None]) -> Path | None:
    """An empty store, built once per machine and library version (None if it cannot be)."""
    template = CACHE / name
    if template.exists():
        return template
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            built = Path(tmp) / "store.db"
            build(built)
            os.replace(built, template)
    except Exception:  # a read-only home, say: each store is then built from nothing
        return None
    return template


def tables(path: Path) -> set[str]:
    """The tables of an existing SQLite file, read without writing; ValueError says why not.

    One exception to "without writing": a process killed inside a write transaction leaves a
    hot journal (`<file>-journal`) that the next connection must roll back before it may read,
    which a read-only one cannot do ("attempt to write a readonly database"). Then the file is
    opened read-write, never created, and SQLite rolls the dead transaction back, as the
    sweep's own first connection would."""

    def read(mode: str) -> list[tuple[str]]:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode={mode}", uri=True)) as db:
            return db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()

    try:
        try:
            rows = read("ro")
        except sqlite3.OperationalError:
            if not path.with_name(f"{path.name}-journal").exists():
                raise
            rows = read("rw")
    except sqlite3.DatabaseError as err:  # "file is not a database", a directory, no access
        raise ValueError(f"{path} is not a SQLite database ({err})") from None
    return {name for (name,) in rows}


def check_store_file(path: Path, store: str, named: str, key: str, required: set[str]) -> bool:
    """The SQLite file a store (`store`: "Optuna storage", "MLflow store") is to live in, read
    without writing: False when it is new (its folder checked writable), True when it exists and
    holds that store's tables (`required`) or none. A file that is no SQLite database, holds
    another program's tables, or cannot be made is one SweepConfigError naming `key`."""
    from mlflow_study_sweeper.errors import SweepConfigError

    if not path.exists() or path.stat().st_size == 0:
        if not writable_place(path):
            raise SweepConfigError(f"cannot create the {store} {path}: its folder is not writable")
        return False
    try:
        found = tables(path)
    except ValueError as err:
        raise SweepConfigError(
            f"{named} is not an {store}: {err}. Point {key} at another file"
        ) from None
    if found and not found >= required:
        raise SweepConfigError(
            f"{path} is a SQLite database of something else (tables {', '.join(sorted(found)[:4])}"
            f", ...), not an {store}: point {key} at another file (the Optuna storage and the "
            f"MLflow store cannot share one)"
        )
    return True


def writable_place(path: Path) -> bool:
    """Whether a new file can be made at `path` (its nearest existing folder is writable)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


class DatabaseUnreachable(Exception):
    """One connection to a database server failed; the message is its first line, masked."""


def probe(url: str, timeout_s: float = 10.0) -> None:
    """One connection to the database server at `url` (no tables made; a refused login, a
    missing database, no driver and no server all raise DatabaseUnreachable). The one probe of
    both stores: MLflow itself would retry a missing database for about 2 minutes."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    from mlflow_study_sweeper.errors import mask_url

    connect_args = {"connect_timeout": int(timeout_s)} if url.startswith("postgres") else {}
    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:
        lines = str(err).strip().splitlines()
        first = lines[0] if lines else type(err).__name__
        raise DatabaseUnreachable(mask_url(first)[:300]) from None
