"""The PLC interface: a Modbus TCP server with a vision-system register map (docs/plc.md)."""
