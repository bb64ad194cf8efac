"""Hypothesis strategies shared by the protocol tests and the live-gateway fuzzing."""

import copy

from hypothesis import strategies as st

# Any value msgpack can carry, nested a little.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=16)
    | st.binary(max_size=32),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw, base: dict) -> dict:
    """base with one value at any depth replaced by a random value, or removed."""
    d = copy.deepcopy(base)  # to_dict() maps may share nested maps
    paths = []

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                paths.append(path + [k])
                walk(v, path + [k])

    walk(d, [])
    path = draw(st.sampled_from(paths))
    node = d
    for k in path[:-1]:
        node = node[k]
    if draw(st.booleans()):
        node[path[-1]] = draw(msgpack_values)
    else:
        del node[path[-1]]
    return d
