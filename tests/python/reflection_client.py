"""grpcio's reflection client against a sidecar's outbound listener: the
service and method named on stdout, resolved through reflection alone."""

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        assert "shop.v1.Inventory" in services, services
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("shop.v1.Inventory")
        method = service.methods_by_name["GetStock"]
        print(f"{method.full_name}: {method.input_type.full_name} -> {method.output_type.full_name}")


if __name__ == "__main__":
    main(sys.argv[1])
