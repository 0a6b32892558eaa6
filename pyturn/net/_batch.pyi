# Types of the optional C module pyturn/net/_batch.c (see pyturn/net/batch.py).
import socket

BATCH: int

def recv_batch(sock: socket.socket | int, limit: int, /) -> list[tuple[bytes, tuple[str, int]]]: ...
def send_batch(sock: socket.socket | int, items: list[tuple[bytes, tuple[str, int]]], /) -> int: ...
def send_many_to(
    sock: socket.socket | int, address: tuple[str, int], frames: list[bytes], /
) -> int: ...
