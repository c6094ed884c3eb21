// One unary call with grpc-js, in plaintext, to the address given; prints the
// status it ended with as JSON. A refused client must hear why, not retry.
const grpc = require('@grpc/grpc-js');

const [target, path] = process.argv.slice(2);
const client = new grpc.Client(target, grpc.credentials.createInsecure());
const asIs = (bytes) => bytes;
const deadline = new Date(Date.now() + 10_000);
client.makeUnaryRequest(path, asIs, asIs, Buffer.alloc(0), new grpc.Metadata(), { deadline }, (error) => {
  console.log(JSON.stringify({ code: error ? error.code : 0, details: error ? error.details : '' }));
  client.close();
});
