"""Wire a spec's layers into a graph: resolve what each reads, order them, infer channel counts.

A layer reads `inputs` (names of earlier or later layers, or IMAGE); a layer that names none reads
the layer listed before it (the first reads IMAGE). Every walk here is iterative (Kahn's
algorithm), so depth is bounded by MAX_LAYERS, not by Python's recursion limit.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:
    from .spec import Layer

IMAGE = "image"
"""The reserved name of the preprocessed model input; no layer may take it."""
MULTI_INPUT = ("add", "concat")
# Types whose output depth is their input's; conv/local set it, concat sums it.
_SAME_DEPTH_EXCEPT = ("conv", "local", "concat")


def default_inputs(names: Sequence[str], index: int) -> tuple[str, ...]:
    """Return what layer `index` reads when it names nothing: the layer before it, or the image."""
    return (names[index - 1],) if index > 0 else (IMAGE,)


def topological(layers: Sequence[Layer]) -> list[Layer]:
    """Return layers ordered so each comes after what it reads (listing order kept where free).

    ModelError names the layer and its input field for an unknown input or a cycle.
    """
    index = {layer.name: i for i, layer in enumerate(layers)}
    waiting = [0] * len(layers)
    readers: list[list[int]] = [[] for _ in layers]
    for i, layer in enumerate(layers):
        for src in dict.fromkeys(layer.inputs):
            if src == IMAGE:
                continue
            j = index.get(src)
            if j is None:
                raise ModelError(
                    f"{layer.name}: reads unknown layer {src!r}; inputs must name a layer of "
                    f"the spec or {IMAGE!r}",
                    layer=layer.name,
                    field=input_field(layer),
                )
            waiting[i] += 1
            readers[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(layers[i])
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(layers):
        cycle = _cycle(layers, index, waiting)
        first = layers[index[cycle[0]]]
        raise ModelError(
            f"{first.name}: its inputs form a cycle ({' -> '.join(cycle + [cycle[0]])} "
            "reads itself back); a layer may only read layers that do not depend on it",
            layer=first.name,
            field=input_field(first),
        )
    return order


def _cycle(layers: Sequence[Layer], index: dict[str, int], waiting: list[int]) -> list[str]:
    """Return the names of one cycle among the layers left unordered (each reads the next)."""
    at = next(i for i, count in enumerate(waiting) if count)
    path: list[int] = []
    seen: dict[int, int] = {}
    while at not in seen:
        seen[at] = len(path)
        path.append(at)
        # follow an input that is itself stuck: every unordered layer has one
        at = next(index[s] for s in layers[at].inputs if s != IMAGE and waiting[index[s]])
    return [layers[i].name for i in path[seen[at] :]]


def input_field(layer: Layer) -> str:
    """Return the spec field a layer's inputs came from ("inputs" for several, else "input")."""
    return "inputs" if len(layer.inputs) != 1 or layer.type in MULTI_INPUT else "input"


def channels(layers: Sequence[Layer], image_channels: int) -> dict[str, int]:
    """Return {layer: output depth K} for topologically ordered layers, checking channel counts.

    ModelError for `add` inputs of unequal depth and conv groups not dividing C and filters.
    """
    depth = {IMAGE: image_channels}
    for layer in layers:
        cins = [depth[src] for src in layer.inputs]
        if layer.type == "concat":
            depth[layer.name] = sum(cins)
            continue
        if layer.type == "add" and len(set(cins)) > 1:
            shown = ", ".join(f"{s} has {c}" for s, c in zip(layer.inputs, cins, strict=True))
            raise ModelError(
                f"{layer.name}: add needs inputs of equal depth, but {shown} channels",
                layer=layer.name,
                field="inputs",
            )
        c, k = cins[0], layer.filters or 0
        if layer.type == "conv" and (c % layer.groups or k % layer.groups):
            raise ModelError(
                f"{layer.name}: groups {layer.groups} must divide both the input channels ({c}) "
                f"and filters ({layer.filters}); try a divisor of both, e.g. "
                f"{_common_divisor(c, k, layer.groups)}",
                layer=layer.name,
                field="groups",
            )
        depth[layer.name] = layer.filters if layer.filters is not None else c
    return depth


def _common_divisor(a: int, b: int, near: int) -> int:
    """Return the common divisor of a and b closest to near (1 always divides)."""
    from math import gcd

    g = gcd(a, b)
    divisors = [d for d in range(1, g + 1) if g % d == 0]
    return min(divisors, key=lambda d: (abs(d - near), -d))


def readers(layers: Sequence[Layer]) -> dict[str, list[str]]:
    """Return {name: the layers reading it} (a layer reading one input twice is listed twice)."""
    out: dict[str, list[str]] = {layer.name: [] for layer in layers}
    out[IMAGE] = []
    for layer in layers:
        for src in layer.inputs:
            out[src].append(layer.name)
    return out


def needed(layers: Sequence[Layer], wanted) -> list[Layer]:
    """Return, in order, the layers a run must compute to produce the wanted names."""
    by_name = {layer.name: layer for layer in layers}
    keep = set()
    stack = [name for name in wanted if name in by_name]
    while stack:
        name = stack.pop()
        if name in keep:
            continue
        keep.add(name)
        stack.extend(src for src in by_name[name].inputs if src != IMAGE and src not in keep)
    return [layer for layer in layers if layer.name in keep]
