"""grpcio calls of all four shapes through a sidecar's outbound listener,
with messages encoded by hand (no generated code): what `protomesh tap`
must show decoded from the contracts."""

import sys

import grpc


def request(message: str, reply_count: int = 0) -> bytes:
    """An echo.v1.EchoRequest: field 1 `message`, field 5 `reply_count`."""
    encoded = message.encode()
    out = b"\x0a" + bytes([len(encoded)]) + encoded
    if reply_count:
        out += b"\x28" + bytes([reply_count])
    return out


def main(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        unary = channel.unary_unary("/echo.v1.Echo/Unary")
        server = channel.unary_stream("/echo.v1.Echo/ServerStream")
        client = channel.stream_unary("/echo.v1.Echo/ClientStream")
        bidi = channel.stream_stream("/echo.v1.Echo/BidiStream")
        unary(request("py-unary"), timeout=10)
        assert len(list(server(request("py-server", reply_count=2), timeout=10))) == 2
        client(iter([request("py-c0"), request("py-c1")]), timeout=10)
        assert len(list(bidi(iter([request("py-b0"), request("py-b1")]), timeout=10))) == 2
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
