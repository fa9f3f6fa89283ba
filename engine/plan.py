"""Plan a run over a graph: which layers to compute, which to fuse, when each value can be freed.

A run computes only the layers the requested outputs depend on, in topological order, as steps.
A step is one layer plus the layers fused into it: a conv followed by a batchnorm (folded into the
conv's weights) and/or a relu (the conv's epilogue), a local layer and its relu, an add and its
relu. A layer is fused into the one it reads only when that one's value is not requested and it is
its only reader, so every requested layer still gets its own values. A value is freed after the
last step reading it unless it was requested: the run's memory is bounded by the live set. An
elementwise step (add, batchnorm, relu, clip, sigmoid, tanh) whose input is freed by that very
step writes its result over that input instead of into a new array (never over the image, which
may be the caller's own array).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .graph import IMAGE, readers
from .spec import Layer

IN_PLACE = ("add", "batchnorm", "relu", "clip", "sigmoid", "tanh")
# What may follow each head type in one step, in order.
_CHAINS = {
    "conv": (("batchnorm", "relu"), ("relu",)),
    "local": (("relu",),),
    "add": (("relu",),),
}


@dataclass(frozen=True)
class Step:
    """One fused computation: `layers[0]` reads its inputs, the result is `layers[-1]`'s value."""

    layers: tuple[Layer, ...]
    frees: tuple[str, ...] = ()
    in_place: str | None = None  # the input whose array the result overwrites

    @property
    def head(self) -> Layer:
        return self.layers[0]

    @property
    def name(self) -> str:
        """The layer whose value the step produces."""
        return self.layers[-1].name

    def fused(self, kind: str) -> Layer | None:
        """Return the fused follower of this type, if any."""
        return next((lay for lay in self.layers[1:] if lay.type == kind), None)


def plan(layers: Sequence[Layer], wanted: Sequence[str], *, fuse: bool = True) -> list[Step]:
    """Return the steps that compute the wanted layers (topologically ordered layers in)."""
    from .graph import needed

    todo = needed(layers, wanted)
    read_by = readers(todo)
    by_name = {layer.name: layer for layer in todo}
    keep = set(wanted)
    steps: list[list[Layer]] = []
    taken: set[str] = set()
    for layer in todo:
        if layer.name in taken:
            continue
        group = [layer]
        for chain in _CHAINS.get(layer.type, ()) if fuse else ():
            group = [layer]
            for kind in chain:
                last = group[-1]
                users = read_by[last.name]
                if last.name in keep or len(users) != 1 or by_name[users[0]].type != kind:
                    break
                group.append(by_name[users[0]])
            if len(group) > 1:
                break
        taken.update(lay.name for lay in group)
        steps.append(group)
    # Free each value after the last step that reads it, unless it was requested.
    last_read: dict[str, int] = {}
    for i, group in enumerate(steps):
        for src in group[0].inputs:
            last_read[src] = i
    frees: list[list[str]] = [[] for _ in steps]
    for src, i in last_read.items():
        if src not in keep:
            frees[i].append(src)
    out = []
    for group, freed in zip(steps, frees, strict=True):
        over = None
        if group[0].type in IN_PLACE:
            ins = group[0].inputs
            # not a value the step reads twice (add [a, b, a]): it would change while being read
            over = next((s for s in ins if s in freed and s != IMAGE and ins.count(s) == 1), None)
        out.append(Step(tuple(group), tuple(freed), over))
    return out


def peak_bytes(steps: Sequence[Step], shapes: dict[str, tuple[int, int, int]], n: int) -> int:
    """Return the most float32 activation bytes a run of steps holds at once for n images.

    shapes maps IMAGE and every layer to (H, W, C). Counts the input, every value still to be read
    or requested, and the step's output while it is made (unless it overwrites its input); not the
    kernels' own scratch buffers.
    """

    def size(name: str) -> int:
        h, w, c = shapes[name]
        return 4 * n * h * w * c

    live = {IMAGE: size(IMAGE)}
    held = peak = live[IMAGE]
    for step in steps:
        out = size(step.name)
        peak = max(peak, held + (0 if step.in_place else out))
        live[step.name] = out
        held += out
        for src in step.frees:
            held -= live.pop(src, 0)
    return peak
