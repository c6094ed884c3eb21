// A gRPC-Web client as a browser app builds it (connect-web over fetch),
// run in Node against a sidecar's inbound.web listener. The service
// comes from the contracts' descriptor set, so no code is generated.
// Usage: node grpc_web_calls.mjs BASE_URL DESCRIPTOR_SET; prints one JSON line.
import { readFileSync } from "node:fs";
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

const [baseUrl, descriptors] = process.argv.slice(2);
const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(descriptors)));
const echo = createClient(registry.getService("echo.v1.Echo"), createGrpcWebTransport({ baseUrl, useBinaryFormat: true }));

const unary = await echo.unary({ message: "from a browser" });
const streamed = [];
for await (const reply of echo.serverStream({ message: "s", replyCount: 3 })) {
  streamed.push(reply.sequence);
}
// A method the listener does not open to callers without a certificate.
const inventory = createClient(registry.getService("shop.v1.Inventory"), createGrpcWebTransport({ baseUrl, useBinaryFormat: true }));
let denied = null;
try {
  await inventory.getStock({ sku: "A1" });
} catch (error) {
  const connect = ConnectError.from(error);
  denied = { code: connect.code, message: connect.rawMessage };
}
console.log(JSON.stringify({ unary: unary.message, caller: unary.caller, streamed, denied }));
