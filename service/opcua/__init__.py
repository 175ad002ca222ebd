"""OPC UA server for SCADA/MES (docs/opcua.md): the optional 'opcua' extra (asyncua)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engines.errors import DefectsamError

if TYPE_CHECKING:
    from service.config.models import OpcuaSection
    from service.opcua.service import OpcuaService, Station

INSTALL_HINT = "pip install 'defectsam[opcua]'"


def create_service(config: OpcuaSection, station: Station) -> OpcuaService:
    """The OPC UA service (not started); one clear line when asyncua is not installed."""
    try:
        import asyncua  # noqa: F401
    except ImportError:
        raise DefectsamError(f"opcua.enabled is true but the OPC UA server needs asyncua (the 'opcua' extra): "
                             f"{INSTALL_HINT}") from None
    from service.opcua.service import OpcuaService

    return OpcuaService(config, station)
