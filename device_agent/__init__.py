"""The device runtime: a pool of devices each holding one agent (:mod:`device_agent.pool`), its
private store (:mod:`device_agent.store`), the round-following process (:mod:`device_agent.agent`)
and the Flower ClientApp (:mod:`device_agent.flower_client`). Imports no server code."""
