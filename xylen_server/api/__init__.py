"""The gRPC face of the model server.

``servicer``      ModelService: protobuf in, one domain call, protobuf out
``messages``      domain results to protobuf messages, in one place
``interceptors``  cross-cutting concerns on every call (metrics)
``metrics``       the Recorder the metrics interceptor writes to (calls and events)
``admission``     before any work: undecodable bytes, load shedding, field limits
``limits``        the limit of every request field, checked by admission and the stream
"""
