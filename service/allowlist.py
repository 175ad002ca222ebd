"""Which peers may connect: the client allowlist of the Modbus TCP and OPC UA servers (plc.allowlist, opcua.allowlist).

Entries are IP addresses or networks (CIDR); an empty list allows any peer. An IPv4 peer seen through an
IPv6 socket (::ffff:10.0.5.20) is matched as its IPv4 address; a zone suffix (fe80::1%eth0) is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence


def check_entries(entries: list[str]) -> list[str]:
    """``entries`` unchanged, or ValueError naming the first that is not an IP address or network."""
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    return entries


class Allowlist:
    def __init__(self, entries: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(entry, strict=False) for entry in entries]

    def allows(self, host: str) -> bool:
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)
