"""A trial's .hydra/ files, rendered again only where a trial changed them.

Hydra writes each job's config.yaml (the app's config) and hydra.yaml (the hydra node under its
key) with OmegaConf.to_yaml. A trial changes a few values of them (the searched keys, the job's
number, its folder, overrides and environment): YamlTree keeps the text of every key of every
mapping and of every item of every list, and renders again, in one YAML dump per file, only the
values that changed, each where it stands in the document (as deep as in the whole document, so
that a long string wraps at the same place). The text is to_yaml's, byte for byte (tested).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import get_omega_conf_dumper  # what OmegaConf.to_yaml dumps with


class HydraYaml:
    """What Hydra writes to .hydra/hydra.yaml: OmegaConf.to_yaml of the hydra node under its
    key. The parts a trial changes (`job`, `overrides`, `runtime`) are read again per trial
    and rendered again where they changed (YamlTree); the others' text is kept from the first
    trial."""

    PER_TRIAL = ("job", "overrides", "runtime")

    def __init__(self) -> None:
        self.parts: dict[str, str] = {}
        self.trees = {key: YamlTree(("hydra", key)) for key in self.PER_TRIAL}

    def __call__(self, config: DictConfig) -> str:
        if not self.parts:
            hydra = OmegaConf.to_container(config.hydra, resolve=False, enum_to_str=True)
            body = drop_lines(yaml_text({"hydra": hydra}), 1)
            self.parts = dict(zip(hydra, split_blocks(body, 2), strict=True))
        per_trial = [key for key in self.PER_TRIAL if key in self.parts]
        texts = render([self.trees[key] for key in per_trial], [config.hydra[k] for k in per_trial])
        self.parts.update(zip(per_trial, texts, strict=True))
        return "hydra:\n" + "".join(self.parts.values())


class Held:
    """The texts of a mapping's keys (or a list's items) as last rendered, each with the repr
    of its value (which tells 1 from 1.0 and from True, as YAML does); a mapping or a list under
    a key is kept the same way."""

    __slots__ = ("entries", "heading", "kind")

    def __init__(self, kind: type) -> None:
        self.kind = kind  # dict or list
        self.heading = ""  # the line of its key, for one under a key
        self.entries: dict[Any, Entry] = {}  # by key, or by index

    def text(self, value: Any) -> str:
        keys = value if self.kind is dict else range(len(value))
        return self.heading + "".join(self.entries[k].text for k in keys)


class Entry:
    __slots__ = ("held", "number", "seen", "text")

    def __init__(self, value: Any, text: str, held: Held | None) -> None:
        self.seen, self.text, self.held = repr(value), text, held
        # a number's text ends its one line: another number takes its place, without a dump
        number = number_text(value)
        found = number is not None and text.count("\n") == 1 and text.endswith(number + "\n")
        self.number = number if found else None


def number_text(value: Any) -> str | None:
    """What YAML writes for an int or a float (PyYAML's representer: never quoted, never
    wrapped); None for anything else."""
    if type(value) is int:
        return str(value)
    if type(value) is not float:
        return None
    if value != value:
        return ".nan"
    if value in (float("inf"), -float("inf")):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value).lower()
    return text.replace("e", ".0e", 1) if "." not in text and "e" in text else text


class YamlTree:
    """OmegaConf.to_yaml of a mapping at `path` of a document, kept key by key (see Held)."""

    def __init__(self, path: tuple[str, ...] = ()) -> None:
        self.path = path
        self.root: Held | None = None

    def __call__(self, node: DictConfig) -> str:
        return render([self], [node])[0]


def render(trees: list[YamlTree], nodes: list[DictConfig]) -> list[str]:
    """The text of each tree's mapping (`nodes`, each at its tree's path in one document, all
    paths of the same depth): what changed in any of them is rendered in one dump."""
    containers = [OmegaConf.to_container(n, resolve=False, enum_to_str=True) for n in nodes]
    changes: list[dict[Any, Any] | None] = []
    document: dict[Any, Any] = {}
    for tree, value in zip(trees, containers, strict=True):
        if not isinstance(value, dict) or not value:  # not a mapping of keys: as to_yaml has it
            changes.append(None)
            continue
        if tree.root is None:
            tree.root = Held(dict)
        found = diff(value, tree.root)
        changes.append(found)
        if found or not tree.root.heading:
            mapping = document
            for key in tree.path:
                mapping = mapping.setdefault(key, {})
            mapping.update(built(found, value))
    if document:
        try:
            take(trees, containers, changes, document, yaml_text(document))
        except ValueError:  # a text split otherwise than expected: rendered whole, not kept
            for tree in trees:
                tree.root = None
            return [whole(tree, value) for tree, value in zip(trees, containers, strict=True)]
    return [
        whole(tree, value) if found is None else tree.root.text(value)
        for tree, value, found in zip(trees, containers, changes, strict=True)
    ]


def whole(tree: YamlTree, value: Any) -> str:
    """The text of the value at the tree's path, rendered whole."""
    if not tree.path:
        return yaml_text(value)
    text = yaml_text(under(tree.path[:-1], {tree.path[-1]: value}))
    return drop_lines(text, len(tree.path) - 1)


def diff(value: Any, held: Held) -> dict[Any, Any]:
    """What changed in `value` since `held`: {key: None} for a value rendered whole again,
    {key: {...}} for a mapping or list under the key with only some of its entries changed."""
    found: dict[Any, Any] = {}
    items = value.items() if held.kind is dict else enumerate(value)
    for key, item in items:
        entry = held.entries.get(key)
        seen = repr(item)
        if entry is not None and entry.seen == seen:
            continue
        number = number_text(item)
        if entry is not None and entry.number is not None and number is not None:
            entry.text = entry.text[: -len(entry.number) - 1] + number + "\n"
            entry.seen, entry.number = seen, number
            continue
        inner = entry.held if entry is not None else None
        if inner is not None and held.kind is dict and trackable(item, inner):
            changed = diff(item, inner)
            if changed:
                found[key] = changed
            else:  # its entries in another order, or fewer of them: none to render
                entry.seen, entry.text = seen, inner.text(item)
        else:
            found[key] = None
    return found


def trackable(value: Any, held: Held) -> bool:
    """Whether `value` can be rendered in part on what `held` keeps: a mapping, or a list of
    the same length (its items are rendered whole)."""
    if held.kind is dict:
        return isinstance(value, dict) and bool(value)
    return isinstance(value, list) and len(value) == len(held.entries)


def built(found: dict[Any, Any], value: Any) -> Any:
    """The part of the document to render: the changed entries of `value` alone."""
    if isinstance(value, list):
        return [value[i] if found[i] is None else built(found[i], value[i]) for i in found]
    return {k: value[k] if sub is None else built(sub, value[k]) for k, sub in found.items()}


def take(
    trees: list[YamlTree],
    containers: list[Any],
    changes: list[dict[Any, Any] | None],
    document: dict[Any, Any],
    text: str,
) -> None:
    """Each tree's changed entries, their texts cut out of the document's `text`."""
    depth = len(trees[0].path)
    mapping, body = document, text
    for level in range(depth - 1):  # down to the level that holds the trees' mappings
        (key,) = mapping
        mapping, body = mapping[key], split_blocks(body, 2 * level)[0].split("\n", 1)[1]
    pieces = dict(zip(mapping, split_blocks(body, 2 * (depth - 1)), strict=True)) if depth else {}
    for tree, value, found in zip(trees, containers, changes, strict=True):
        if found is None or (depth and tree.path[-1] not in pieces):
            continue
        if depth:
            heading, rest = pieces[tree.path[-1]].split("\n", 1)
            tree.root.heading = heading + "\n"
        else:
            rest = text
        keep(tree.root, value, found, rest, 2 * depth)


def keep(held: Held, value: Any, found: dict[Any, Any], body: str, indent: int) -> None:
    """The texts of the changed entries of `value` (the body of its text, its entries at
    `indent`) into `held`."""
    pieces = split_blocks(body, indent) if held.kind is dict else split_items(body, indent)
    for key, piece in zip(found, pieces, strict=True):
        item, sub = value[key], found[key]
        if sub is None:  # a list's items are kept whole
            inner = adopted(item, piece, indent) if held.kind is dict else None
            held.entries[key] = Entry(item, piece, inner)
            continue
        entry = held.entries[key]
        heading, rest = piece.split("\n", 1)
        entry.held.heading = heading + "\n"
        keep(entry.held, item, sub, rest, indent + 2 if entry.held.kind is dict else indent)
        entry.seen, entry.text = repr(item), entry.held.text(item)


def adopted(value: Any, text: str, indent: int) -> Held | None:
    """What to keep of a mapping or list under a key rendered whole (its text: `text`, the
    key at `indent`), entry by entry; None for anything else."""
    if not value or not isinstance(value, (dict, list)):
        return None
    heading, rest = text.split("\n", 1)
    held = Held(type(value))
    held.heading = heading + "\n"
    if isinstance(value, dict):
        for (key, item), piece in zip(value.items(), split_blocks(rest, indent + 2), strict=True):
            held.entries[key] = Entry(item, piece, adopted(item, piece, indent + 2))
    else:
        for index, piece in enumerate(split_items(rest, indent)):
            held.entries[index] = Entry(value[index], piece, None)
        if len(held.entries) != len(value):
            raise ValueError("a list's items were not split one by one")
    return held


def under(path: tuple[str, ...], mapping: dict[Any, Any]) -> dict[Any, Any]:
    """`mapping` as the value at `path` of a document that holds nothing else."""
    for key in reversed(path):
        mapping = {key: mapping}
    return mapping


def drop_lines(text: str, n: int) -> str:
    """`text` without its first `n` lines (only newlines end a line: a YAML text's other line
    separators are inside its scalars)."""
    for _ in range(n):
        text = text.split("\n", 1)[1]
    return text


def yaml_text(container: Any) -> str:
    """OmegaConf.to_yaml of a plain container (to_container's output), without making a config
    of it first. One whose strings are all plain (see PLAIN) is written by libyaml's emitter,
    a tenth of PyYAML's time, where that is installed: a trial's changed values (its folder,
    overrides, run id) are."""
    dumper = _LIBYAML_DUMPER if _LIBYAML_DUMPER and plain(container) else get_omega_conf_dumper()
    return yaml.dump(
        container, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=dumper
    )


# Strings of these characters alone (ASCII letters, digits, a space and `_./=,:+@-`) come out
# of libyaml's emitter as out of PyYAML's, quoted or not, wrapped or not (tested on random
# ones); the two differ elsewhere (wrapping double-quoted strings, non-ASCII text).
PLAIN = re.compile(r"[A-Za-z0-9 _./=,:+@-]*")


def plain(value: Any) -> bool:
    """Whether every string in a container (keys too) is of PLAIN's characters, and every other
    value a number, a bool or None."""
    if isinstance(value, str):
        return PLAIN.fullmatch(value) is not None
    if isinstance(value, dict):
        return all(plain(k) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(item) for item in value)
    return value is None or type(value) in (int, float, bool)


def _libyaml_dumper() -> type | None:
    """OmegaConf's dumper (its representers: which strings it quotes) on libyaml's emitter."""
    if not getattr(yaml, "__with_libyaml__", False):
        return None
    base = get_omega_conf_dumper()
    dumper = type("OmegaConfLibyamlDumper", (yaml.CDumper,), {})
    for kind, represent in base.yaml_representers.items():
        dumper.add_representer(kind, represent)
    return dumper


_LIBYAML_DUMPER = _libyaml_dumper()


def split_blocks(text: str, indent: int = 0) -> list[str]:
    """A block-style YAML mapping's text (its keys `indent` spaces in), split before each key,
    in their order (a key's line starts at the indent with neither a space nor a `-`)."""
    blocks: list[str] = []
    for line in text.split("\n")[:-1]:
        if line[:indent].strip() == "" and line[indent : indent + 1] not in (" ", "-", ""):
            blocks.append("")
        if not blocks:
            raise ValueError("a mapping's text that does not start with a key")
        blocks[-1] += line + "\n"
    return blocks


def split_items(text: str, indent: int = 0) -> list[str]:
    """A block-style YAML list's text (its items `indent` spaces in, `- ` first), split before
    each item."""
    items: list[str] = []
    for line in text.split("\n")[:-1]:
        if line[:indent].strip() == "" and line[indent : indent + 2] == "- ":
            items.append("")
        if not items:
            raise ValueError("a list's text that does not start with an item")
        items[-1] += line + "\n"
    return items
