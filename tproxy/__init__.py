"""tproxy: a transparent TCP proxy that connects to the application from the client's own IP address."""

__version__ = "0.1.0"
