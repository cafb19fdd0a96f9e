"""The contract both sides of a run share, below the servers and the device agent.

- :mod:`contract.runspec`: the public description of a run (``RunSpec``);
- :mod:`contract.schedule`: a day's round — its steps, phase and slot names, codecs, round
  specs — and how a pool's devices are split into secure-sum participants;
- :mod:`contract.round`: the one round state machine every transport drives, and its
  in-memory driver;
- :mod:`contract.wire`: secure-sum configuration ⇄ ``decentsim.v1`` messages;
- :mod:`contract.transcript`, :mod:`contract.views`: what a server records for its auditor.
"""
