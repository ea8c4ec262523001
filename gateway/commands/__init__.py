"""FTP command handlers, grouped by topic; :class:`gateway.server.GatewayServer` combines them."""
