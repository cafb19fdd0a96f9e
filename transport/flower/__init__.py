"""Flower: DeviceGateway calls tunnelled through Flower messages (:mod:`~transport.flower.tunnel`,
the device's stub :mod:`~transport.flower.stub`) and Flower's quiet environment
(:mod:`~transport.flower.env`)."""
