"""The gRPC face of the model server.

``servicer``      ModelService: protobuf in, one domain call, protobuf out
``messages``      domain results to protobuf messages, in one place
``interceptors``  cross-cutting concerns on every call (metrics)
``metrics``       the Recorder the metrics interceptor writes to (calls and events), and its
                  RPC instruments
``telemetry``     the server's series for ``/metrics`` and its ``/health`` JSON
``admission``     before any work: undecodable bytes, load shedding, field limits
``limits``        the limit of every request field, checked by admission and the stream
"""
