"""Reading XLA's optimized HLO: which matmuls became YNNPACK fusions, and
whether two steps compiled to the same program.

XLA:CPU hands a ``dot`` to YNNPACK (a ``kCustom`` fusion whose backend config
says ``__ynn_fusion``) only in some forms, e.g. not when the left operand is
contracted on its major axis (``lhs_contracting_dims={0}`` for a matrix);
those stay XLA ``dot``\\ s. ``matmuls`` lists every dot of a module with its
engine, so a benchmark can show which form reaches which.
"""

from __future__ import annotations

import re

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (fusion|dot)\(")
_CONTRACTING = re.compile(
    r"lhs_contracting_dims=\{([\d,]*)\}.*?rhs_contracting_dims=\{([\d,]*)\}"
)


def matmuls(hlo: str) -> list[dict]:
    """The matmuls of an optimized HLO module, each with ``engine``
    (``"ynnpack"`` for a ``__ynn_fusion``, else an XLA ``dot``), output shape,
    contracting dims and ``backward`` (a ``transpose(...)`` in its op name)."""
    lines, current = [], None  # (computation, line) of each instruction
    for line in hlo.splitlines():
        if m := _COMPUTATION.match(line):
            current = m.group(1)
        elif _INSTRUCTION.match(line):
            lines.append((current, line))
    calls = {
        re.search(r"calls=%([\w.\-]+)", line).group(1): line
        for _, line in lines
        if _INSTRUCTION.match(line).group(3) == "fusion"
    }
    out = []
    for comp, line in lines:
        if _INSTRUCTION.match(line).group(3) != "dot":
            continue
        outer = calls.get(comp, line)  # the fusion that holds this dot, if any
        if "__ynn_fusion" in outer:
            engine = "ynnpack"
        else:
            engine = "xla dot" + (" (fused)" if comp in calls else "")
        op_name = re.search(r'op_name="([^"]*)"', outer)
        lhs, rhs = _CONTRACTING.search(line).groups()
        out.append(
            {
                "engine": engine,
                "shape": _INSTRUCTION.match(outer).group(2).split("{")[0],
                "contracting": f"lhs {{{lhs}}}, rhs {{{rhs}}}",
                "backward": bool(op_name and "transpose(" in op_name.group(1)),
            }
        )
    return out


def ynn_count(dots: list[dict]) -> str:
    def part(ds):
        return f"{sum(d['engine'] == 'ynnpack' for d in ds)}/{len(ds)}"

    fwd = [d for d in dots if not d["backward"]]
    bwd = [d for d in dots if d["backward"]]
    return f"{part(fwd)} fwd, {part(bwd)} bwd"


_ANY_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*?\s[a-z][\w\-]*\(")


def program_key(hlo: str) -> tuple[str, ...]:
    """The HLO's instructions without names and metadata, sorted: two steps
    with the same key compile to the same program."""
    out = []
    for line in hlo.splitlines():
        if _ANY_INSTRUCTION.match(line):
            line = re.sub(r", metadata=\{[^}]*\}", "", line)
            out.append(re.sub(r"%[\w.\-]+", "%", line).strip())
    return tuple(sorted(out))


def hlo_text(v) -> str | None:
    if v.lower is None:
        return None
    compiled = v.lower().compile()
    return getattr(compiled, "compiled", compiled).as_text()  # Equinox wraps it


def programs(variants):
    """Per variant: its matmuls and a letter naming its compiled program."""
    texts = {v.name: hlo_text(v) for v in variants}
    keys = {}
    letter = {
        k: keys.setdefault(program_key(t), chr(ord("A") + len(keys))) if t else None
        for k, t in texts.items()
    }
    return {k: t and matmuls(t) for k, t in texts.items()}, letter


def show_hlo(wl, variants, args) -> None:
    dots, letter = programs(variants)
    print(f"\n### {wl.name}, batch {wl.batch}: matmuls of the optimized HLO")
    for v in variants:
        print(f"\n{v.name} (program {letter[v.name]}): {ynn_count(dots[v.name])}")
        for d in dots[v.name] or ():
            way = "backward" if d["backward"] else "forward "
            print(f"  {way} {d['engine']:16s} {d['shape']:18s} {d['contracting']}")
