"""``evgw drivers SLUG``: a profile in words."""

from __future__ import annotations

from gateway.modbus.types import DataType, RegisterSpec
from gateway.model import DeviceKind
from gateway.profiles.spec import ControlSpec, Profile

__all__ = ["describe_profile"]


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _fmt_register(spec: RegisterSpec) -> str:
    parts = [
        f"{spec.table:<8}",
        f"{spec.address:>5}",
        f"{spec.address:#06x}",
        f"{spec.type}" + (f"[{spec.count}]" if spec.type.is_text else ""),
    ]
    extra: list[str] = []
    if spec.count > 1 and not spec.type.is_text:
        extra.append(spec.word_order.value)
    if spec.byte:
        extra.append(f"byte {spec.byte}")
    if spec.mask is not None:
        extra.append(f"mask {spec.mask:#x}")
    if spec.scale != 1.0:
        extra.append(f"x{_fmt_num(spec.scale)}")
    if spec.offset:
        extra.append(f"{spec.offset:+g}")
    if spec.sentinels:
        extra.append("n/a " + ",".join(f"{s:#x}" for s in sorted(spec.sentinels)))
    if spec.every_s:
        extra.append(f"every {_fmt_num(spec.every_s)}s")
    return "  ".join([*parts, " ".join(extra)]).rstrip()


def _fmt_provenance(r: RegisterSpec) -> str:
    known = r.known or "unknown"
    flag = "" if r.known == "hardware" else " [unverified]"
    return f"{known}{flag}: {r.source or 'no source given'}"


def _fmt_control(c: ControlSpec) -> str:
    r = c.register
    text = f"{r.table} {r.address} ({r.address:#06x}) {r.type}, function {c.function}"
    return text + (f", {r.word_order}" if r.count > 1 else "") + f" [{_fmt_provenance(r)}]"


def describe_profile(p: Profile) -> str:
    """Human-readable summary for ``evgw drivers SLUG``."""
    c = p.connection
    lines = [f"{p.slug}: {p.manufacturer} {p.model} ({p.kind})"]
    if p.description:
        lines.append(f"  {p.description}")
    lines.append(f"transports: {', '.join(c.transports)}")
    defaults = f"defaults: unit {c.default_unit}"
    if any(t != "rtu" for t in c.transports):
        defaults += f", port {c.default_port}"
    if any(t.startswith("rtu") for t in c.transports):
        defaults += f", serial {c.baudrate} 8{c.parity}{c.stopbits}"
        for baud, parity, stopbits in c.serial_alternatives:
            defaults += f" (or {baud} 8{parity}{stopbits})"
    lines.append(defaults)
    reads = f"reads: up to {c.max_registers_per_read} registers, gap {c.max_gap}"
    if c.single_value_reads:
        reads += ", one value per request"
    if c.inter_request_delay_s:
        reads += f", {_fmt_num(c.inter_request_delay_s * 1000)} ms between requests"
    lines.append(reads)
    if c.rejects_gaps:
        lines.append("  the device rejects reads over unused registers: no gaps are read")
    lines.append("registers (provenance under each; [unverified] = never checked on hardware):")
    width = max((len(r.name) for r in p.registers), default=4)
    for r in p.registers:
        unit = f" {r.unit}" if r.unit else ""
        lines.append(f"  {r.name:<{width}}  {_fmt_register(r)}{'  ->' + unit if unit else ''}")
        lines.append(f"  {'':<{width}}    {_fmt_provenance(r)}")
    if p.kind is DeviceKind.CHARGER:
        lines.append("capabilities:")
        if p.state is not None:
            lines.append(
                f"  state: {len(p.state.rules)} rules over "
                + ", ".join(sorted({c.register for r in p.state.rules for c in r.when}))
            )
        if p.tag is not None:
            tag_reg = p.register(p.tag.register)
            enc = {
                DataType.ASCII: "ASCII, 2 characters per register",
                DataType.ASCII1: "1 character per register",
                DataType.HEX: "raw bytes as hex",
            }[tag_reg.type]
            empty = ", ".join(repr(e) for e in sorted(p.tag.empty))
            lines.append(
                f"  tag: {tag_reg.name} at {tag_reg.table} {tag_reg.address}, "
                f"{tag_reg.count} registers, {enc} (empty: {empty})"
            )
            if p.tag.not_a_user:
                lines.append(
                    "  tag values that are no user: " + ", ".join(sorted(p.tag.not_a_user))
                )
        else:
            lines.append("  tag: none (no identification over Modbus)")
        if p.enable is not None:
            lines.append(f"  enable: {_fmt_control(p.enable)}, on {p.enable.on} off {p.enable.off}")
        else:
            lines.append(
                "  enable: none (current limit 0 pauses)" if p.current_limit else "  enable: none"
            )
        pause = p.pause_method
        lines.append(
            "  pause: "
            + {
                "enable": "enable (the enable control; never a current below the minimum)",
                "current_limit": "current_limit (write the limit's disable value)",
            }.get(pause or "", "none (cannot be paused)")
            + ("" if p.pause else " [default]")
        )
        for w in p.on_connect:
            lines.append(
                f"  on connect: write {w.value} to {_fmt_control(w.control)}"
                + (f" ({w.note})" if w.note else "")
            )
        if p.current_limit is not None:
            cl = p.current_limit
            lines.append(
                f"  current limit: {_fmt_control(cl.control)}, unit {cl.unit}, "
                f"{_fmt_num(cl.min_a)}..{_fmt_num(cl.max_a)} A"
                + (f", {cl.disable} pauses" if cl.disable is not None else "")
            )
        else:
            lines.append("  current limit: none")
        if p.heartbeat is not None:
            hb = p.heartbeat
            what = (
                "rewrite the current limit"
                if hb.rewrites_current_limit
                else f"write {hb.value} to {_fmt_control(hb.control)}"
            )
            lines.append(
                f"  heartbeat: {what} every {_fmt_num(hb.period_s)}s "
                f"(device timeout {_fmt_num(hb.timeout_s)}s, failsafe "
                f"{_fmt_num(hb.failsafe_current_a)} A)"
            )
        else:
            lines.append("  heartbeat: none")
        if p.phases is not None:
            lines.append(f"  phases: {_fmt_control(p.phases)}, 1p={p.phases.off} 3p={p.phases.on}")
        lines.append(
            f"  session energy resets: {p.session_energy_resets}"
            + ("" if p.has_lifetime_energy else " (no lifetime energy counter)")
        )
    if p.identify is not None:
        i = p.identify
        lo = i.min if i.min is not None else "-inf"
        hi = i.max if i.max is not None else "inf"
        test = f"matches {i.pattern!r}" if i.pattern else f"in {lo}..{hi}"
        unit = f" on unit {i.unit}" if i.unit is not None else ""
        lines.append(f"identify: {_fmt_register(i.register)}{unit}, {test}")
        lines.append(f"  {_fmt_provenance(i.register)}")
    if p.sources:
        lines.append("sources:")
        lines.extend(f"  - {s}" for s in p.sources)
    if p.uncertain:
        lines.append("uncertain (verify on hardware):")
        lines.extend(f"  - {u}" for u in p.uncertain)
    return "\n".join(lines)
