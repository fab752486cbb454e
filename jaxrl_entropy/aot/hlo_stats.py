"""What a compiled (partitioned, optimised) HLO module does per device, counted with loop trips.

XLA's own `cost_analysis()` counts the body of a `while` loop once; an RL step is mostly loops
(gradient accumulation over micro-batches, the old-policy forward over chunks, the chunked
log-softmax). This reader walks the module's call graph, multiplies each computation by the trip
count of the loops around it (read from the loop condition's `counter < constant`), and sums:

- matmul FLOPs (`dot` and `convolution`), 2 per multiply-add;
- collectives (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute): count and
  bytes of the per-device result (reduce-scatter: of its input);
- HBM traffic estimate: operand + result bytes of every op outside a fusion (a fusion reads its
  inputs and writes its outputs once), the same model XLA's cost analysis uses; a slice or a
  gather reads only what it takes and an in-place update (dynamic-update-slice, scatter) writes
  only the update (loop bodies index big buffers: the KV pool, the accumulators); a Pallas call
  counts its whole operands (an upper bound: the paged-attention kernel reads only live pages);
- Pallas/Mosaic custom calls (their FLOPs are invisible here; callers add them analytically).

    stats = hlo_stats.analyze(compiled.as_text())
    stats.flops, stats.bytes, stats.collectives["all-gather"].bytes, stats.unknown_trip_loops
"""
from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done", "copy-done",
               "send-done", "recv-done"}

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
                      r"branch_computations|scatter|select)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")


@dataclasses.dataclass
class Collective:
    count: float = 0.0
    bytes: float = 0.0


@dataclasses.dataclass
class HloStats:
    flops: float
    bytes: float
    collectives: dict[str, Collective]
    custom_calls: dict[str, float]
    unknown_trip_loops: int          # loops whose trip count could not be read (counted once)
    largest_collectives: list[tuple[str, str, float]]   # (kind, shape, times run), biggest first

    @property
    def collective_bytes(self) -> float:
        return sum(c.bytes for c in self.collectives.values())


@dataclasses.dataclass
class _Instr:
    name: str
    type: str
    opcode: str
    rest: str          # operands and attributes


def _split_type(s: str) -> tuple[str, str]:
    """`(s32[], f32[2]{0}) while(%t), ...` → (type, remainder)."""
    s = s.strip()
    if s.startswith("("):
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return s[: i + 1], s[i + 1:].strip()
    m = re.match(r"(\S+)\s*(.*)$", s)
    return (m.group(1), m.group(2)) if m else (s, "")


def array_bytes(type_str: str) -> float:
    """Bytes of every array in a (possibly tuple) HLO type string."""
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(type_str))


def _largest_array(type_str: str) -> tuple[str, float]:
    best, size = "", 0.0
    for dt, dims in _ARRAY.findall(type_str):
        b = DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
        if b >= size:
            best, size = f"{dt}[{dims}]", b
    return best, size


def _dims(type_str: str) -> list[int]:
    m = _ARRAY.search(type_str)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def parse(text: str) -> tuple[dict[str, list[_Instr]], str, set[str]]:
    """Computations (name → instructions, in text order), the entry's name, and the fused ones."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and not line.lstrip().startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        type_str, rest = _split_type(m.group(2))
        op = re.match(r"([\w\-]+)\((.*)$", rest)
        if not op:
            continue
        comps[current].append(_Instr(m.group(1), type_str, op.group(1), op.group(2)))
    fused = {callee for instrs in comps.values() for ins in instrs if ins.opcode == "fusion"
             for callee in _callees(ins)}
    return comps, entry or (list(comps)[-1] if comps else ""), fused


def _callees(ins: _Instr) -> list[str]:
    out = []
    for _, names in _CALLEES.findall(ins.rest):
        out += [n.strip().lstrip("%") for n in names.split(",")]
    return out


def _attr(rest: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", rest)
    return m.group(1) if m else None


def _operands(rest: str) -> list[str]:
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def _constants(instrs: list[_Instr]) -> dict[str, int]:
    out = {}
    for ins in instrs:
        if ins.opcode == "constant":
            m = re.match(r"\s*(-?\d+)\s*\)", ins.rest)
            if m:
                out[ins.name] = int(m.group(1))
    return out


def _bound(compare: _Instr, values: dict[str, int]) -> int | None:
    d = re.search(r"direction=(\w+)", compare.rest)
    ops = _operands(compare.rest)
    if d and len(ops) == 2 and ops[1] in values and d.group(1) in ("LT", "LE"):
        return values[ops[1]] + (d.group(1) == "LE")
    return None


def _trip_count(cond: list[_Instr], comps: dict[str, list[_Instr]]) -> int | None:
    """`i < N` (or `i <= N`) against a constant in a loop condition, the compare written out or
    wrapped in a fusion (as the CPU compiler does)."""
    consts = _constants(cond)
    for ins in cond:
        if ins.opcode == "compare":
            n = _bound(ins, consts)
            if n is not None:
                return n
        elif ins.opcode == "fusion":
            callees = _callees(ins)
            body = comps.get(callees[0], []) if callees else []
            outer = _operands(ins.rest)
            values = dict(_constants(body))
            for p in body:  # a fusion parameter fed by a constant of the condition
                if p.opcode == "parameter":
                    k = int(re.match(r"\s*(\d+)", p.rest).group(1))
                    if k < len(outer) and outer[k] in consts:
                        values[p.name] = consts[outer[k]]
            for c in body:
                if c.opcode == "compare":
                    n = _bound(c, values)
                    if n is not None:
                        return n
    return None


def _dot_flops(ins: _Instr, types: dict[str, str]) -> float:
    out = math.prod(_dims(ins.type))
    ops = _operands(ins.rest)
    if ins.opcode == "dot":
        lhs = _dims(types.get(ops[0], "")) if ops else []
        contract = _attr(ins.rest, "lhs_contracting_dims")
        k = math.prod(lhs[int(i)] for i in contract.split(",") if i) if contract and lhs else 1
        return 2.0 * out * k
    # convolution: every output element takes (kernel size / output features) multiply-adds
    rhs = _dims(types.get(ops[1], "")) if len(ops) > 1 else []
    labels = re.search(r"dim_labels=[^_]*_([^-]*)->", ins.rest)
    if not rhs or not labels or "o" not in labels.group(1):
        return 0.0
    return 2.0 * out * math.prod(rhs) / rhs[labels.group(1).index("o")]


def analyze(text: str) -> HloStats:
    comps, entry, fused = parse(text)
    mult: dict[str, float] = {name: 0.0 for name in comps}
    mult[entry] = 1.0
    unknown = 0
    # callees are defined before their callers: reverse text order visits callers first
    for name in reversed(list(comps)):
        m = mult.get(name, 0.0)
        if not m:
            continue
        for ins in comps[name]:
            if ins.opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", ins.rest).group(1)
                cond = re.search(r"condition=%?([\w.\-]+)", ins.rest).group(1)
                trips = _trip_count(comps.get(cond, []), comps)
                if trips is None:
                    unknown += 1
                    trips = 1
                mult[body] = mult.get(body, 0.0) + m * trips
                mult[cond] = mult.get(cond, 0.0) + m * (trips + 1)
                continue
            for callee in _callees(ins):
                if callee in mult:
                    mult[callee] += m
    flops = traffic = 0.0
    coll = {k: Collective() for k in COLLECTIVES}
    custom: dict[str, float] = {}
    largest: dict[tuple[str, str], float] = {}
    for name, instrs in comps.items():
        m = mult.get(name, 0.0)
        if not m:
            continue
        types = {ins.name: ins.type for ins in instrs}
        for ins in instrs:
            op = ins.opcode
            if op in ("dot", "convolution"):
                flops += m * _dot_flops(ins, types)
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', ins.rest)
                key = target.group(1) if target else "?"
                custom[key] = custom.get(key, 0.0) + m
            base = op[:-6] if op.endswith("-start") else op
            if base in COLLECTIVES:
                if base == "reduce-scatter":
                    ops = _operands(ins.rest)
                    shape, size = _largest_array(types.get(ops[0], "")) if ops else ("", 0.0)
                else:
                    shape, size = _largest_array(ins.type)
                coll[base].count += m
                coll[base].bytes += m * size
                largest[(base, shape)] = largest.get((base, shape), 0.0) + m
            if name not in fused and op not in _NO_TRAFFIC:
                traffic += m * _traffic(ins, types, comps)
    big = sorted(largest.items(), key=lambda kv: -_shape_bytes(kv[0][1]) * kv[1])[:8]
    return HloStats(flops=flops, bytes=traffic, collectives=coll, custom_calls=custom, unknown_trip_loops=unknown,
                    largest_collectives=[(k, s, n) for (k, s), n in big])


def _indexed_read(ins: _Instr, operand: str) -> bool:
    """`ins` reads only a part of `operand`: a dynamic slice or a gather from it."""
    return ins.opcode in ("dynamic-slice", "gather") and _operands(ins.rest)[:1] == [operand]


def _updated_in_place(ins: _Instr, operand: str) -> bool:
    """`ins` writes a part of `operand` in place: a dynamic update slice or a scatter into it."""
    return ins.opcode in ("dynamic-update-slice", "scatter") and _operands(ins.rest)[:1] == [operand]


def _update_bytes(ins: _Instr, types: dict[str, str]) -> float:
    """Bytes an in-place update writes: its update operand (DUS: the 2nd; scatter: the last)."""
    ops = _operands(ins.rest)
    upd = ops[1] if ins.opcode == "dynamic-update-slice" else ops[-1]
    return array_bytes(types.get(upd, ""))


def _traffic(ins: _Instr, types: dict[str, str], comps: dict[str, list[_Instr]]) -> float:
    """Bytes an unfused op moves to and from HBM."""
    operands = _operands(ins.rest)
    sizes = [array_bytes(types.get(o, "")) for o in operands]
    if ins.opcode in ("dynamic-slice", "gather"):
        return 2.0 * array_bytes(ins.type)
    if ins.opcode in ("dynamic-update-slice", "scatter"):
        return 2.0 * _update_bytes(ins, types)
    if ins.opcode != "fusion":
        return array_bytes(ins.type) + sum(sizes)
    callees = _callees(ins)
    body = comps.get(callees[0], []) if callees else []
    if not body:
        return array_bytes(ins.type) + sum(sizes)
    users: dict[str, list[_Instr]] = {}
    for i in body:
        for o in _operands(i.rest):
            users.setdefault(o, []).append(i)
    params = {int(re.match(r"\s*(\d+)", i.rest).group(1)): i.name for i in body if i.opcode == "parameter"}
    reads = 0.0
    for k, size in enumerate(sizes):
        name = params.get(k, "")
        uses = users.get(name, [])
        if uses and all(_indexed_read(u, name) for u in uses):
            reads += sum(array_bytes(u.type) for u in uses)          # reads only its slices / rows
        elif uses and all(_updated_in_place(u, name) for u in uses):
            continue                                                  # updated in place: not read
        else:
            reads += size
    root = body[-1]  # the ROOT is printed last
    writes = array_bytes(ins.type)
    if root.opcode in ("dynamic-update-slice", "scatter"):
        writes = _update_bytes(root, {i.name: i.type for i in body})
    return reads + writes


def _shape_bytes(shape: str) -> float:
    return array_bytes(shape)
