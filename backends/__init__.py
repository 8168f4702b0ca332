"""Rule backends: :func:`get_backend` picks one by the config's ``backend`` name (``nftables`` or ``iptables``)."""

from __future__ import annotations

from tproxy.backends.base import Backend


def get_backend(name: str) -> Backend:
    """A fresh backend object for ``name``; raises ValueError for an unknown name (the config loader checks first)."""
    if name == "nftables":
        from tproxy.backends.nftables import NftablesBackend

        return NftablesBackend()
    if name == "iptables":
        from tproxy.backends.iptables import IptablesBackend

        return IptablesBackend()
    raise ValueError(f"unknown rule backend {name!r} (expected nftables or iptables)")


__all__ = ["Backend", "get_backend"]
