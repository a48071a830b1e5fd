"""The peak temporary memory of a compiled XLA:CPU program without the CPU backend's bf16 -> f32 weight upcasts.

XLA:CPU has no native bf16 dot: it converts both operands of a bf16 dot to f32, and hoists the convert of a
loop-invariant operand (a weight read in a decode loop or a layer scan) out of the loop, so every bf16 weight a loop
reads costs a whole f32 copy of it in the program's temporaries, live for the whole loop. TPU and GPU read bf16 in
their dots, so those buffers do not exist there, and the CPU-compiled `temp` of `starling-jax plan` overstates what an
accelerator holds (issue 13; flags that might keep bf16 dots on XLA:CPU were tried without effect).

`upcast_report(lowered)` compiles the program with XLA's dump of the optimised module, its buffer assignment and its
buffer live ranges (the schedule's instruction sequence, nested computations flattened: what the heap simulator packs),
identifies the upcast buffers strictly, and replays the live ranges of the temporary allocation:

- peak_live: the largest number of bytes live at once in the temporary allocation (overlapping values that share the
  same bytes, i.e. aliases of one buffer, counted once). XLA's allocation (`temp_size_in_bytes`) is this plus the
  packing's fragmentation.
- peak_live_without_upcasts: the same replay with each upcast buffer replaced by what a backend with bf16 dots holds
  instead: nothing when the f32 array is a plain convert of an existing bf16 array (a parameter, a slice or an
  all-gather of one), the bf16 array of the same elements (half the bytes) when the fusion also rounds (f32 master
  weight -> bf16 -> f32) or slices.
- temp_accelerator_estimate: temp_size - (peak_live - peak_live_without_upcasts): the same schedule and the same
  fragmentation, minus the upcasts.

An upcast buffer is the output of a fusion (or a bare convert) that only moves data (parameter, convert, bitcast,
copy, reshape, transpose, slice, dynamic-slice, scalar index arithmetic) from one array to an f32 array through a
convert from bf16 (or an all-gather or slice of an upcast); whose source array traces back, through the same data
movement, all-gathers, tuples and while-loop state, to a parameter of the program (a weight; a loop-carried float32
element counts when its initial value is one: the master weights an update loop trains) or to another upcast; and whose every
use, followed through the same data movement and while-loop tuples, is an operand of a dot. Anything else stays
counted. Only the temporaries are replayed: parameters, outputs and the rest are as the CPU compile gives them.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------------------------------
# HLO text.

_MOVE = {"bitcast", "copy", "reshape", "transpose", "slice", "dynamic-slice"}
_GATHER = {"all-gather", "all-gather-start", "all-gather-done"}


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list
    attrs: str
    computation: str
    root: bool = False

    @property
    def dtype(self) -> str:
        return self.shape.split("[", 1)[0] if not self.shape.startswith("(") else "tuple"

    @property
    def scalar(self) -> bool:
        return self.shape.split("{", 1)[0].endswith("[]")

    def attr(self, key: str):
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None


@dataclass
class Module:
    instrs: dict = field(default_factory=dict)        # name -> Instr
    computations: dict = field(default_factory=dict)  # computation name -> [Instr]
    entry: str = ""
    users: dict = field(default_factory=dict)         # name -> [Instr]
    callers: dict = field(default_factory=dict)       # (attribute, computation) -> [Instr], e.g. ("body", c)


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


def parse_hlo(text: str) -> Module:
    """The instructions of an optimised HLO module's text (XLA's *after_optimizations.txt dump)."""
    mod = Module()
    comp = None
    for line in text.splitlines():
        if comp is None:
            m = _HEADER.match(line)
            if m:
                comp = m.group(2)
                mod.computations[comp] = []
                if m.group(1):
                    mod.entry = comp
            continue
        if line.strip() == "}":
            comp = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        rest = line[m.end():]
        if rest.startswith("("):
            end = _balanced(rest, 0)
        else:
            end = rest.index(" ")
        shape, rest = rest[:end], rest[end:].lstrip()
        op_end = rest.index("(")
        opcode = rest[:op_end]
        close = _balanced(rest, op_end)
        operands = re.findall(r"%([\w.\-]+)", rest[op_end:close])
        ins = Instr(m.group(2), shape, opcode, operands, rest[close:], comp, bool(m.group(1)))
        if opcode == "parameter":
            ins.index = int(re.match(r"\((\d+)\)", rest[op_end:close]).group(1))
        mod.instrs[ins.name] = ins
        mod.computations[comp].append(ins)
    for ins in mod.instrs.values():
        for o in ins.operands:
            mod.users.setdefault(o, []).append(ins)
        for key in ("body", "condition", "calls"):
            if ins.attr(key):
                mod.callers.setdefault((key, ins.attr(key)), []).append(ins)
    return mod


def _param(mod: Module, computation: str, index: int):
    return next((i for i in mod.computations[computation] if i.opcode == "parameter" and i.index == index), None)


def _callers(mod: Module, computation: str, key: str):
    return mod.callers.get((key, computation), [])


def _root(mod: Module, computation: str):
    return next(i for i in mod.computations[computation] if i.root)


# ----------------------------------------------------------------------------------------------------------------------
# Upcast buffers.


def _movement_body(mod: Module, ins: Instr):
    """(source operand index, has bf16->f32 convert, rounds, slices) when `ins` only moves data from one non-scalar
    array (a fusion of data movement, or a bare convert); None otherwise."""
    if ins.opcode == "convert":
        src = mod.instrs.get(ins.operands[0])
        if src is None:
            return None
        return 0, src.dtype == "bf16" and ins.dtype == "f32", False, False
    if ins.opcode != "fusion":
        return None
    body = mod.computations.get(ins.attr("calls"))
    if body is None:
        return None
    sources, upcast, rounds, slices = [], False, False, False
    for i in body:
        if i.opcode == "parameter":
            if not i.scalar:
                sources.append(i.index)
            continue
        if i.scalar:
            continue  # dynamic-slice index arithmetic
        if i.opcode == "convert":
            src = mod.instrs[i.operands[0]]
            if src.dtype == "bf16" and i.dtype == "f32":
                upcast = True
            elif src.dtype == "f32" and i.dtype == "bf16":
                rounds = True
            else:
                return None
        elif i.opcode in ("slice", "dynamic-slice"):
            slices = True
        elif i.opcode not in _MOVE:
            return None
    if len(sources) != 1:
        return None
    return sources[0], upcast, rounds, slices


def _source(mod: Module, name: str, upcasts: dict, seen=None):
    """"param" when array `name` is a parameter of the program (a weight) or data movement / an all-gather of one,
    "upcast" when it is (data movement of) an upcast buffer, following loop-invariant while-loop elements; else None."""
    seen = set() if seen is None else seen
    if name in seen:
        return None
    seen.add(name)
    ins = mod.instrs.get(name)
    if ins is None:
        return None
    if name in upcasts:
        return "upcast"
    if ins.opcode == "parameter":
        return "param" if ins.computation == mod.entry else None
    if ins.opcode in _MOVE | _GATHER or (ins.opcode == "fusion" and _movement_body(mod, ins) is not None):
        k = 0 if ins.opcode != "fusion" else _movement_body(mod, ins)[0]
        return _source(mod, ins.operands[k], upcasts, seen)
    if ins.opcode == "get-tuple-element":
        tup = mod.instrs[ins.operands[0]]
        index = int(ins.attr("index"))
        if tup.opcode == "tuple":
            return _source(mod, tup.operands[index], upcasts, seen)
        if tup.opcode == "parameter":  # a while body's (or condition's) loop state: follow invariant elements
            comp = tup.computation
            loops = _callers(mod, comp, "body") + _callers(mod, comp, "condition")
            found = set()
            for loop in loops:
                root = _root(mod, loop.attr("body"))
                carried = mod.instrs[root.operands[index]] if root.opcode == "tuple" else None
                invariant = (carried is not None and carried.opcode == "get-tuple-element"
                             and int(carried.attr("index")) == index
                             and mod.instrs[carried.operands[0]].opcode == "parameter")
                init = mod.instrs[loop.operands[0]]
                source = _source(mod, init.operands[index], upcasts, seen) if init.opcode == "tuple" else None
                # a loop-invariant element is its initial value; one the loop updates is still "a weight" when it is
                # float32 and starts as a parameter (the master weights an update loop trains), not when it starts as
                # an upcast or is bf16 (an activation carried through the loop)
                found.add(source if invariant or (source == "param" and ins.dtype == "f32") else None)
            return found.pop() if len(found) == 1 else None
    return None


def _feeds_dots(mod: Module, name: str, seen=None) -> bool:
    """Whether every use of array `name`, followed through data movement and while-loop state, is a dot operand."""
    seen = set() if seen is None else seen
    if name in seen:
        return True
    seen.add(name)
    ins = mod.instrs[name]
    users = mod.users.get(name, [])
    if not users:
        return False if ins.root else True
    if ins.root:
        comp = ins.computation
        if not _callers(mod, comp, "body"):
            return False  # an output of the program or of a fusion
    for u in users:
        if u.opcode == "dot":
            continue
        if u.opcode == "custom-call" and re.search(r"matmul|dot", u.attrs, re.I):
            continue
        if u.opcode in _MOVE | _GATHER or u.opcode == "get-tuple-element":
            if not _feeds_dots(mod, u.name, seen):
                return False
            continue
        if u.opcode == "fusion" and (move := _movement_body(mod, u)) is not None and u.operands[move[0]] == name:
            if not _feeds_dots(mod, u.name, seen):  # a slice / re-rounding of it (itself an upcast candidate)
                return False
            continue
        if u.opcode == "fusion":
            body = u.attr("calls")
            params = [_param(mod, body, k) for k, o in enumerate(u.operands) if o == name]
            if not params or not all(_fused_feeds_dots(mod, p.name) for p in params):
                return False
            continue
        if u.opcode == "tuple":
            indices = [k for k, o in enumerate(u.operands) if o == name]
            loops = [w for w in mod.users.get(u.name, []) if w.opcode == "while"]
            if u.root and _callers(mod, u.computation, "body"):
                continue  # carried unchanged to the next iteration (checked where the loop state is read)
            if not loops or len(loops) != len(mod.users.get(u.name, [])):
                return False
            for loop in loops:
                for comp in (loop.attr("body"), loop.attr("condition")):
                    p = _param(mod, comp, 0)
                    for g in mod.users.get(p.name, []):
                        if g.opcode == "get-tuple-element" and int(g.attr("index")) in indices:
                            if not _feeds_dots(mod, g.name, seen):
                                return False
                for g in mod.users.get(loop.name, []):
                    if g.opcode == "get-tuple-element" and int(g.attr("index")) in indices:
                        if not _feeds_dots(mod, g.name, seen):
                            return False
            continue
        return False
    return True


def _fused_feeds_dots(mod: Module, name: str) -> bool:
    """Inside a fusion: whether parameter `name` reaches only dot operands (through data movement)."""
    for u in mod.users.get(name, []):
        if u.opcode == "dot":
            continue
        if u.opcode in _MOVE and _fused_feeds_dots(mod, u.name):
            continue
        return False
    return bool(mod.users.get(name))


def find_upcasts(mod: Module) -> dict:
    """{instruction name: accelerator bytes fraction} of the upcast buffers: 0.0 where a backend with bf16 dots holds
    nothing instead (a plain convert of an existing bf16 array), 0.5 where it holds the bf16 array of the same
    elements (the fusion rounds an f32 weight to bf16, or slices, all-gathers or re-rounds an upcast)."""
    candidates = {}
    for ins in mod.instrs.values():
        if ins.computation != mod.entry and not _callers(mod, ins.computation, "body"):
            continue  # instructions of fused / called computations are not buffers of their own
        if ins.dtype != "f32" or ins.scalar:
            continue
        if ins.opcode in _GATHER:
            candidates[ins.name] = (0, False, False, True)
            continue
        body = _movement_body(mod, ins)
        if body is not None:
            candidates[ins.name] = body
    upcasts: dict = {}
    changed = True
    while changed:  # an upcast may read another (a slice, re-rounding or all-gather of an upcast)
        changed = False
        for name, (k, upcast, rounds, slices) in candidates.items():
            if name in upcasts:
                continue
            source = _source(mod, mod.instrs[name].operands[k], upcasts)
            if source is None or (source == "param" and not upcast) or not _feeds_dots(mod, name):
                continue
            upcasts[name] = 0.5 if (rounds or slices or source == "upcast") else 0.0
            changed = True
    return upcasts


# ----------------------------------------------------------------------------------------------------------------------
# Buffer assignment and live ranges.


@dataclass
class TempValue:
    name: str       # instruction name of the defining position
    key: str        # live-range key, e.g. "fusion.3{}" or "while.1{2}"
    size: int
    offset: int


def parse_temp_values(buffer_assignment: str):
    """(temp allocation bytes, [TempValue]) of the preallocated temporary allocation(s) in XLA's
    *buffer-assignment.txt dump."""
    total, values, in_temp = 0, [], False
    for line in buffer_assignment.splitlines():
        m = re.match(r"allocation \d+: size (\d+),(.*):$", line)
        if m:
            in_temp = "preallocated-temp" in m.group(2)
            if in_temp:
                total += int(m.group(1))
            continue
        if not line.startswith(" value: ") or not in_temp:
            if not line.startswith(" "):
                in_temp = False if not line.startswith("allocation") else in_temp
            continue
        v = re.match(r" value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\)", line)
        name = v.group(1)
        key = name if "{" in name else name + "{}"
        values.append(TempValue(name.split("{", 1)[0], key, int(v.group(2)), int(v.group(3))))
    return total, values


def parse_live_ranges(live_range: str) -> dict:
    """{value key: (start, end)} from XLA's *live-range.txt dump."""
    out, on = {}, False
    for line in live_range.splitlines():
        if line.strip() == "BufferLiveRange:":
            on = True
            continue
        if on:
            m = re.match(r"\s+(\S+\{[^}]*\}):(\d+)-(\d+)$", line)
            if not m:
                if line.strip() and not line.startswith("    "):
                    break
                continue
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def peak_live(values, ranges: dict, scale: dict | None = None) -> int:
    """The most bytes live at once: values sharing one chunk (offset, size) while live are aliases of one buffer
    (counted once, with the largest scale of any of them: an alias of an upcast is the upcast). scale: {key: 0..1}."""
    scale = scale or {}
    events = []
    for v in values:
        if v.key not in ranges:
            continue
        s, e = ranges[v.key]
        events.append((s, 0, (v.offset, v.size), scale.get(v.key, 1.0)))
        events.append((e + 1, 1, (v.offset, v.size), scale.get(v.key, 1.0)))
    events.sort(key=lambda ev: (ev[0], -ev[1]))  # frees before allocations at the same position
    live: dict = {}  # chunk -> list of scales live
    current, best = 0.0, 0.0
    for _, kind, chunk, sc in events:
        before = max(live[chunk]) * chunk[1] if live.get(chunk) else 0.0
        if kind == 0:
            live.setdefault(chunk, []).append(sc)
        else:
            live[chunk].remove(sc)
        after = max(live[chunk]) * chunk[1] if live.get(chunk) else 0.0
        current += after - before
        best = max(best, current)
    return int(round(best))


def _alias_closure(values, ranges: dict, upcast_keys: dict) -> dict:
    """Extend {key: scale} to the values that share an upcast's bytes while it is live (the same buffer)."""
    by_chunk: dict = {}
    for v in values:
        if v.key in ranges:
            by_chunk.setdefault((v.offset, v.size), []).append(v)
    out = dict(upcast_keys)
    changed = True
    while changed:
        changed = False
        for group in by_chunk.values():
            for a in group:
                if a.key not in out:
                    continue
                sa, ea = ranges[a.key]
                for b in group:
                    sb, eb = ranges[b.key]
                    if b.key not in out and sb <= ea and sa <= eb:
                        out[b.key] = out[a.key]
                        changed = True
    return out


def analyse(hlo_text: str, buffer_assignment: str, live_range: str) -> dict:
    mod = parse_hlo(hlo_text)
    upcasts = find_upcasts(mod)
    temp, values = parse_temp_values(buffer_assignment)
    ranges = parse_live_ranges(live_range)
    keys = {v.key: upcasts[v.name] for v in values if v.name in upcasts and v.key.endswith("{}")}
    keys = _alias_closure(values, ranges, keys)
    full = peak_live(values, ranges)
    without = peak_live(values, ranges, keys)
    removed = sum(v.size * (1 - keys[v.key]) for v in values if v.key in keys and v.name in upcasts)
    return {"temp_size": temp, "peak_live": full, "peak_live_without_upcasts": without,
            "temp_accelerator_estimate": max(0, temp - (full - without)),
            "upcast_buffers": len([v for v in values if v.key in keys and v.name in upcasts]),
            "upcast_bytes_removed_at_most": int(removed)}


def upcast_report(lowered):
    """(compiled, report) for a jax `Lowered`: compiles it with XLA's buffer dumps and analyses them (see the module
    docstring). report is None (with the reason in `error`) when the dump cannot be read."""
    tmp = tempfile.mkdtemp(prefix="starling_plan_hlo_")
    try:
        compiled = lowered.compile(compiler_options={"xla_dump_to": tmp, "xla_dump_hlo_as_text": True})
        found = {}
        for suffix in ("after_optimizations.txt", "after_optimizations-buffer-assignment.txt",
                       "after_optimizations-live-range.txt"):
            paths = sorted(glob.glob(os.path.join(tmp, f"*{suffix}")))
            if not paths:
                return compiled, {"error": f"XLA wrote no *{suffix} dump"}
            found[suffix] = max(paths, key=os.path.getmtime)  # the last module compiled: this one
        texts = [open(found[s]).read() for s in found]
        try:
            report = analyse(*texts)
        except (ValueError, KeyError, AttributeError, IndexError, StopIteration, TypeError) as e:
            return compiled, {"error": f"could not read XLA's buffer dump ({type(e).__name__}: {e})"}
        mem = compiled.memory_analysis()
        if report["temp_size"] != int(mem.temp_size_in_bytes):
            return compiled, {"error": f"the dump's temporary allocation ({report['temp_size']} bytes) is not the "
                                       f"compiled program's ({int(mem.temp_size_in_bytes)})"}
        return compiled, report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
