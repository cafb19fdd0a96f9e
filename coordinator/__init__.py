"""The coordinator: enrolment, the round state machine with deadlines, persistence and the
device gateway (:mod:`coordinator.service`), and the same service as a Flower ServerApp
(:mod:`coordinator.flower_server`)."""
