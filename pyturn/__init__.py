"""pyturn: a STUN/TURN relay server for WebRTC."""

__version__ = "0.1.0"
