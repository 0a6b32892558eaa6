"""The codec's own error: any bytes either decode or raise this, never anything else."""


class DecodeError(ValueError):
    """The bytes are not a well-formed STUN message, attribute or ChannelData frame.

    The server answers a request that raises this with 400 (when a transaction id could
    be read) or drops it, as RFC 8489 §6.3 allows.
    """
