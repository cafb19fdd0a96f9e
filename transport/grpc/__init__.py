"""gRPC: the device gateway servicer (:mod:`~transport.grpc.gateway`), the server-to-server link
(:mod:`~transport.grpc.link`), the device side (:mod:`~transport.grpc.client`) and channels
(:mod:`~transport.grpc.channels`)."""
