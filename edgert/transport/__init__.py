"""Transports: HTTP on the Unix socket (http, uds) and MQTT."""
