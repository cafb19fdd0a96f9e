"""Thin adapters that carry the contract's messages: gRPC over (m)TLS (:mod:`transport.grpc`)
and Flower's Message API (:mod:`transport.flower`). No protocol logic lives here."""
