"""The host names that mean this machine: servers bound to them are unreachable from others (so they need no
warning), and clients reach them without a proxy."""

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
