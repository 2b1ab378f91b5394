"""Limits on what a small input may ask for (config sizes, YAML expansion), checked before building.

A 1 KB config with `layers_per_block: 200000` or a YAML preset of nested aliases would make
planning build or walk gigabytes; these are refused with one line instead.
"""

from __future__ import annotations

import yaml
import reprlib

from .errors import InputError

# Far above every published SD/SD-XL UNet, ControlNet, VAE and CLIP vision encoder.
CONFIG_LIMITS = {
    "layers_per_block": 16, "num_hidden_layers": 128, "num_attention_heads": 256,
    "hidden_size": 16384, "intermediate_size": 65536, "projection_dim": 16384,
    "image_size": 4096, "patch_size": 1024, "cross_attention_dim": 16384,
    "transformer_layers_per_block": 64, "attention_head_dim": 4096, "num_channels": 64,
    "in_channels": 64, "out_channels": 64, "conditioning_channels": 64, "latent_channels": 64,
    "sample_size": 4096, "addition_time_embed_dim": 16384, "projection_class_embeddings_input_dim": 65536,
    "norm_num_groups": 1024, "time_embedding_dim": 65536, "encoder_hid_dim": 65536,
}
ANY_INT = 1 << 20  # any other integer field (channels, sizes)
LIST_MAX = 16  # items in a per-block list (block_out_channels, down_block_types ...)
YAML_NODES_MAX = 10_000  # scalars + collections of a preset once aliases are expanded
YAML_DEPTH_MAX = 32


def shown(value, limit: int = 60) -> str:
    """A short repr for messages: never the whole of a large or deep value."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlevel, r.maxlist, r.maxdict = 2, 4, 4
    return r.repr(value)


def _too_big(key: str, value, limit: int) -> bool:
    items = value if isinstance(value, list) else [value]
    return any(isinstance(v, int) and not isinstance(v, bool) and not -1 <= v <= limit for v in items)


def check_config(config: dict, what: str, error=InputError) -> dict:
    """Every number of a model config within CONFIG_LIMITS (others ANY_INT), lists short."""
    for key, value in config.items():
        if isinstance(value, list) and len(value) > LIST_MAX:
            raise error(f"{what}: {key!r} has {len(value)} items; at most {LIST_MAX} are plausible")
        if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            if any(isinstance(v, list) and len(v) > LIST_MAX for v in value):
                raise error(f"{what}: {key!r} holds a list over {LIST_MAX} items")
            value = [x for v in value for x in (v if isinstance(v, list) else [v])]
        limit = CONFIG_LIMITS.get(key, ANY_INT)
        if _too_big(key, value, limit):
            raise error(f"{what}: {key!r} is {shown(value)}; the limit is {limit}")
    return config


def check_yaml(text: str, source: str, error) -> None:
    """A YAML text whose nesting and alias expansion are bounded, and whose mappings have no
    repeated keys; checked on the parser's events and composed nodes, never on built values."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # a generator: no recursion
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > YAML_DEPTH_MAX:
                    raise error(f"{source}: nested more than {YAML_DEPTH_MAX} levels deep")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the caller's safe_load reports the syntax error with its line
    if root is None:
        return
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:  # expanded node count, each shared (aliased) node counted once per use
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node, source, error) if done or isinstance(node, yaml.ScalarNode) else None
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
        elif done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > YAML_NODES_MAX:
                raise error(f"{source}: expands to over {YAML_NODES_MAX} values (aliases); "
                            "a preset is a few dozen")
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node, source, error) if id(c) not in sizes)


def _children(node, source: str, error) -> list:
    """The nodes under a collection node; a mapping's repeated scalar key is refused."""
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise error(f"{source}: line {key.start_mark.line + 1}: key {shown(key.value)} "
                                "given twice")
                seen.add(key.value)
        return [n for pair in node.value for n in pair]
    return []
