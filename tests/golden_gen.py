"""The golden rule files: one per case and backend, the whole ``tproxy rules show`` output.

Regenerate with ``just golden`` (``python -m tests.golden_gen``) after an intended change to the renderers, and read
the diff before committing it. The matrix: {tproxy, nat, nat+preserve_source} x {iptables, nftables} x {IPv4 only,
IPv6 only, both}, plus exclusions, interface filters, the loopback upstream, non-wildcard listeners, many ports.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tproxy.config import Config

GOLDEN_DIR = Path(__file__).parent / "golden"
BACKENDS = ("iptables", "nftables")
REGENERATE = "python -m tests.golden_gen  (or: just golden)"

_MODES: dict[str, dict[str, Any]] = {
    "tproxy": {"mode": "tproxy"},
    "nat": {"mode": "nat"},
    "nat_preserve": {"mode": "nat", "proxy": {"preserve_source": True}},
}
_FAMILIES: dict[str, dict[str, bool]] = {
    "v4": {"ipv4": True, "ipv6": False},
    "v6": {"ipv4": False, "ipv6": True},
    "both": {"ipv4": True, "ipv6": True},
}
_PORTS = [8080, "9000-9100"]


def _doc(base: dict[str, Any], intercept: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    doc["intercept"] = {"ports": list(_PORTS), **(intercept or {})}
    for k, v in top.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return doc


def cases() -> dict[str, dict[str, Any]]:
    """Case name -> TOML document (as parsed), without the backend."""
    out: dict[str, dict[str, Any]] = {}
    for m, mdoc in _MODES.items():
        for f, fdoc in _FAMILIES.items():
            out[f"{m}-{f}"] = _doc(mdoc, fdoc)
        out[f"{m}-exclusions"] = _doc(
            mdoc,
            {
                "exclude_ports": [9050, "9060-9069"],
                "exclude_cidrs": ["198.18.0.0/24", "198.19.1.7/32", "fd00:1::/64"],
            },
        )
        out[f"{m}-interfaces"] = _doc(mdoc, {"interfaces": ["veth0", "eth1"]})
        out[f"{m}-loopback"] = _doc(mdoc, proxy={"upstream": "loopback"})
        out[f"{m}-loopback-interfaces"] = _doc(mdoc, {"interfaces": ["veth0"]}, proxy={"upstream": "loopback"})
        out[f"{m}-listener-v4"] = _doc(mdoc, {"ipv6": False}, listener={"address": "198.18.0.1", "port": 5000})
        out[f"{m}-listener-v6"] = _doc(mdoc, {"ipv4": False}, listener={"address": "fd00::1", "port": 5000})
    out["tproxy-many-ports"] = _doc(
        {"mode": "tproxy"}, {"ports": [*range(8001, 8013), "9000-9010", "9100-9110", 10000, 10001]}
    )
    udp = {"udp_ports": [53, "5000-5010"]}
    out["tproxy-udp"] = _doc({"mode": "tproxy"}, udp)
    out["tproxy-udp-exclusions"] = _doc(
        {"mode": "tproxy"}, {**udp, "exclude_ports": [5005], "exclude_cidrs": ["198.18.0.0/24", "fd00:1::/64"]}
    )
    out["tproxy-udp-interfaces"] = _doc({"mode": "tproxy"}, {**udp, "interfaces": ["veth0", "eth1"]})
    out["tproxy-udp-listener-v6"] = _doc({"mode": "tproxy"}, {**udp, "ipv4": False}, listener={"address": "fd00::1"})
    out["tproxy-udp-loopback"] = _doc({"mode": "tproxy"}, udp, proxy={"upstream": "loopback"})
    out["tproxy-mark-table"] = _doc({"mode": "tproxy"}, routing={"mark": 0x100, "table": 4242})
    return out


def config(name: str, backend: str) -> Config:
    return Config.from_dict(cases()[name], source=f"golden:{name}", backend=backend)


def golden_path(name: str, backend: str) -> Path:
    return GOLDEN_DIR / backend / f"{name}.txt"


def render(name: str, backend: str) -> str:
    from tproxy import rules

    return rules.show(config(name, backend))


def main() -> int:
    written = 0
    for backend in BACKENDS:
        (GOLDEN_DIR / backend).mkdir(parents=True, exist_ok=True)
        wanted = {golden_path(n, backend) for n in cases()}
        for stale in (GOLDEN_DIR / backend).glob("*.txt"):
            if stale not in wanted:
                stale.unlink()
                print(f"removed {stale}")
        for name in cases():
            path = golden_path(name, backend)
            text = render(name, backend)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                print(f"wrote {path}")
                written += 1
    print(f"{written} golden file(s) changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
