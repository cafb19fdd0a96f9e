"""Running a federation on one machine: the processes of ``decentsim federated run``
(:mod:`launcher.federation`), ``decentralize()`` (:mod:`launcher.decentralized`) and the Flower
simulation engine path (:mod:`launcher.flower`)."""
