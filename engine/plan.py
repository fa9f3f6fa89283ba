"""Plan a run over a graph: which layers to compute, which to fuse, when each value can be freed.

A run computes only the layers the requested outputs depend on, in topological order, as steps.
A step is one layer plus the layers fused into it: a conv followed by a batchnorm (folded into the
conv's weights), a residual add (the conv's result added to the add's other inputs in its store)
and/or a relu (the conv's epilogue), a local layer and its relu, an add and its relu. A layer is
fused into the one it reads only when that one's value is not requested and it is its only
reader, so every requested layer still gets its own values. A step runs where its last layer sits
in the order, so an add's other inputs are ready. A value is freed after the last step reading it
unless it was requested: the run's memory is bounded by the live set. An elementwise step (add,
batchnorm, relu, clip, sigmoid, tanh), or a conv step with a fused add, whose input is freed by
that very step writes its result over that input instead of into a new array (never over the
image, which may be the caller's own array). A conv step whose only reader is a concat (and not
requested) writes straight into its channel slice of the concat's output, allocated by the first
such step: the concat then copies only its other inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .graph import IMAGE, readers
from .spec import Layer

IN_PLACE = ("add", "batchnorm", "relu", "clip", "sigmoid", "tanh")
# What may follow each head type in one step, in this order, each kind optional.
_FOLLOWERS = {
    "conv": ("batchnorm", "add", "relu"),
    "local": ("relu",),
    "add": ("relu",),
}


@dataclass(frozen=True)
class Step:
    """One fused computation: `layers[0]` reads its inputs, the result is `layers[-1]`'s value."""

    layers: tuple[Layer, ...]
    frees: tuple[str, ...] = ()
    in_place: str | None = None  # the input whose array the result overwrites
    # (concat, first channel, end channel): write the result into that slice of the concat's
    # output; a concat step's `filled` names the inputs already written so.
    into: tuple[str, int, int] | None = None
    filled: tuple[str, ...] = ()

    @property
    def residuals(self) -> tuple[str, ...]:
        """The inputs of a fused add other than the value of the layers before it."""
        add = self.fused("add")
        if add is None:
            return ()
        before = self.layers[self.layers.index(add) - 1].name
        return tuple(src for src in add.inputs if src != before)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every value the step reads: the head's inputs and a fused add's residuals."""
        return (*self.head.inputs, *self.residuals)

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


def _group(layer: Layer, read_by, by_name, keep, taken) -> list[Layer]:
    """Return layer and the followers fused into it: each kind of _FOLLOWERS in turn, taken
    when the value so far is not requested, that layer is its only reader and is in no step."""
    group = [layer]
    for kind in _FOLLOWERS.get(layer.type, ()):
        last = group[-1]
        users = read_by[last.name]
        if last.name in keep or len(users) != 1 or users[0] in taken:
            break
        if by_name[users[0]].type == kind:
            group.append(by_name[users[0]])
    return group


def plan(
    layers: Sequence[Layer],
    wanted: Sequence[str],
    *,
    fuse: bool = True,
    depth: dict[str, int] | None = None,
) -> list[Step]:
    """Return the steps that compute the wanted layers (topologically ordered layers in).

    depth ({layer: output channels}) lets conv steps write into their concat's output.
    """
    from .graph import needed

    todo = needed(layers, wanted)
    read_by = readers(todo)
    by_name = {layer.name: layer for layer in todo}
    at = {layer.name: i for i, layer in enumerate(todo)}
    keep = set(wanted)
    groups: list[list[Layer]] = []
    taken: set[str] = set()
    for layer in todo:
        if layer.name in taken:
            continue
        group = _group(layer, read_by, by_name, keep, taken) if fuse else [layer]
        taken.update(lay.name for lay in group)
        groups.append(group)
    groups.sort(key=lambda group: at[group[-1].name])
    steps = [Step(tuple(group)) for group in groups]
    # Free each value after the last step that reads it, unless it was requested.
    last_read: dict[str, int] = {}
    for i, step in enumerate(steps):
        for src in step.inputs:
            last_read[src] = i
    frees: list[list[str]] = [[] for _ in steps]
    for src, i in last_read.items():
        if src not in keep:
            frees[i].append(src)
    into = _concat_slices(steps, read_by, by_name, keep, depth) if fuse and depth else {}
    out = []
    for step, freed in zip(steps, frees, strict=True):
        over = None
        head = step.head
        ins = head.inputs
        if head.type in IN_PLACE:
            # not a value the step reads twice (add [a, b, a]): it would change while being read
            over = next((s for s in ins if s in freed and s != IMAGE and ins.count(s) == 1), None)
        elif step.residuals:
            # a residual the conv does not also read (it would change under the conv)
            add_ins = step.fused("add").inputs  # type: ignore[union-attr]
            over = next(
                (
                    s
                    for s in step.residuals
                    if s in freed and s != IMAGE and add_ins.count(s) == 1 and s not in ins
                ),
                None,
            )
        filled = tuple(s for s in ins if s in into) if head.type == "concat" else ()
        out.append(Step(step.layers, tuple(freed), over, into.get(step.name), filled))
    return out


def _concat_slices(steps, read_by, by_name, keep, depth) -> dict[str, tuple[str, int, int]]:
    """Return {step name: (concat, c0, c1)} for conv steps that can write into a concat."""
    heads = {step.name: step for step in steps}
    out = {}
    for step in steps:
        if step.head.type != "concat":
            continue
        ins = step.head.inputs
        c0 = 0
        for src in ins:
            c1 = c0 + depth[src]
            writer = heads.get(src)
            if (
                writer is not None
                and writer.head.type == "conv"
                and not writer.residuals
                and src not in keep
                and read_by[src] == [step.name]
            ):
                out[src] = (step.name, c0, c1)
            c0 = c1
    return out


def peak_bytes(steps: Sequence[Step], shapes: dict[str, tuple[int, int, int]], n: int) -> int:
    """Return the most float32 activation bytes a run of steps holds at once for n images.

    shapes maps IMAGE and every layer to (H, W, C). Counts the input, every value still to be read
    or requested, and the step's output while it is made (unless it overwrites its input or goes
    into a concat's output, which is counted once, from the first step writing into it); not the
    kernels' own scratch buffers.
    """

    def size(name: str) -> int:
        h, w, c = shapes[name]
        return 4 * n * h * w * c

    live = {IMAGE: size(IMAGE)}
    held = peak = live[IMAGE]
    for step in steps:
        target = step.into[0] if step.into else step.name
        out = 0 if step.in_place or target in live else size(target)
        peak = max(peak, held + out)
        live[target] = size(target)
        held += out
        for src in step.frees:
            held -= live.pop(src, 0)
    return peak
