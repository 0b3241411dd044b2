"""The site side: settings, transport to the server, and the Session behind the Client API."""
