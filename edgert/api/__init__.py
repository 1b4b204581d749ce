"""Wire contracts shared by the transports (OpenAI-compatible bodies, MQTT payloads) and the socket client."""
