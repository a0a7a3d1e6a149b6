"""Local provider testbed: OAuth2 server, Dovecot and submission stand-ins (docs/testbed.md)."""
