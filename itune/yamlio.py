"""YAML reading that refuses duplicate keys.

``yaml.safe_load`` keeps the last of two equal keys in a mapping, so a second ``optim:`` block silently replaces
the first. :func:`safe_load_unique` loads exactly as ``yaml.safe_load`` does, but first refuses any mapping that
repeats a key, naming the file, the key's dotted path and both line numbers. This module does not import torch.
"""

from __future__ import annotations

from typing import Any

import yaml

from itune.errors import ConfigError


class UniqueKeyLoader(yaml.SafeLoader):
    """A ``yaml.SafeLoader`` whose documents are checked for duplicate mapping keys before construction.

    Merge keys (``<<: *anchor``) are not duplicates: a key written in the mapping overrides a merged one, as YAML
    says.
    """

    def check_unique_keys(self, node: yaml.Node | None, path: str) -> None:
        """Raises ConfigError for the first mapping under ``node`` that repeats a key (``path`` names the file)."""
        seen_nodes: set[int] = set()
        stack: list[tuple[yaml.Node, str]] = [] if node is None else [(node, "")]
        while stack:
            current, where = stack.pop()
            if id(current) in seen_nodes:  # an alias: checked where its anchor is
                continue
            seen_nodes.add(id(current))
            if isinstance(current, yaml.SequenceNode):
                stack.extend((item, f"{where}[{i}]") for i, item in reversed(list(enumerate(current.value))))
                continue
            if not isinstance(current, yaml.MappingNode):
                continue
            first_line: dict[Any, int] = {}
            children = []
            for key_node, value_node in current.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                dotted = f"{where}.{key}" if where else str(key)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first_line.get(key)
                except TypeError:  # an unhashable key (a mapping or list): construction reports it
                    earlier = None
                else:
                    first_line.setdefault(key, line)
                if earlier is not None:
                    raise ConfigError(f"{path}: duplicate key {dotted!r} at lines {earlier} and {line} "
                                      "(the second would silently replace the first); keep one")
                children.append((value_node, dotted))
            stack.extend(reversed(children))


def safe_load_unique(text: str, path: Any) -> Any:
    """``yaml.safe_load(text)``, refusing a mapping that repeats a key.

    Args:
        text: the YAML document.
        path: the file it was read from (named in the error).

    Returns:
        The loaded document, exactly as ``yaml.safe_load`` returns it (None for an empty document).

    Raises:
        ConfigError: one line, e.g. ``configs/x.yaml: duplicate key 'optim' at lines 12 and 20 (the second would
            silently replace the first); keep one``.
        yaml.YAMLError: the text is not valid YAML (as ``yaml.safe_load``).
    """
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        loader.check_unique_keys(node, str(path))
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()
