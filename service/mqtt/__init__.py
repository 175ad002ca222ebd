"""MQTT for MES/SCADA: results and station state published to a broker (docs/mqtt.md).

``topics`` holds the topic layout with its QoS and retain flags, ``payloads`` the JSON of a result and
of the station state, ``stats`` the snapshot and Prometheus families, ``publisher`` the paho-mqtt
client (the ``mqtt`` extra; imported only when ``mqtt.enabled`` is true).
"""
