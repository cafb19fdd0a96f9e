"""The aggregator: the second, independently operated share holder (:mod:`aggregator.service`).
It imports nothing of the coordinator."""
