"""echo.v1.Echo in grpcio: answers as the request asks, records what it saw."""

import time

import grpc


def _trailer_key(key):
    return key[:-4] + "-trailer-bin" if key.endswith("-bin") else key + "-trailer"


def _echoed(context):
    return tuple((k, v) for k, v in context.invocation_metadata() if k.startswith("x-echo-"))


class EchoBackend:
    def __init__(self, pb, seen):
        self.pb = pb
        self.seen = seen

    def _observe(self, context):
        self.seen.calls += 1
        metadata = dict(context.invocation_metadata())
        self.seen.callers.append(metadata.get("protomesh-caller-id"))
        self.seen.deadline_seen = context.time_remaining()
        context.add_callback(lambda: None if context.is_active() else self.seen.cancelled.set())
        echoed = _echoed(context)
        if echoed:
            context.send_initial_metadata(echoed)
            context.set_trailing_metadata(tuple((_trailer_key(k), v) for k, v in echoed))

    def _fail_if_asked(self, request, context):
        if request.status_code:
            context.abort(grpc.StatusCode(next(c.value for c in grpc.StatusCode if c.value[0] == request.status_code)),
                          request.status_message)

    def Unary(self, request, context):
        self._observe(context)
        time.sleep(request.delay_ms / 1000)
        self._fail_if_asked(request, context)
        return self.pb.EchoReply(message=request.message, payload=request.payload,
                                 caller=dict(context.invocation_metadata()).get("protomesh-caller-id", ""),
                                 received_bytes=len(request.payload))

    def ServerStream(self, request, context):
        self._observe(context)
        for sequence in range(request.reply_count):
            if not context.is_active():
                self.seen.cancelled.set()
                return
            time.sleep(request.delay_ms / 1000)
            yield self.pb.EchoReply(message=request.message, sequence=sequence,
                                    payload=b"\x07" * request.reply_payload_bytes)
        self._fail_if_asked(request, context)

    def ClientStream(self, request_iterator, context):
        self._observe(context)
        count = size = 0
        for request in request_iterator:
            count += 1
            size += len(request.payload)
        return self.pb.EchoReply(message=f"{count} messages", sequence=count, received_bytes=size)

    def BidiStream(self, request_iterator, context):
        self._observe(context)
        for sequence, request in enumerate(request_iterator):
            self._fail_if_asked(request, context)
            yield self.pb.EchoReply(message=request.message, sequence=sequence)
