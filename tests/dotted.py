"""Copies of nested mappings (Kubernetes objects, worker configs) with one value changed at a dotted path."""

import copy


def changed(data: dict, path: str, value) -> dict:
    """A copy of `data` with the dotted `path` set (None removes the key)."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return data
