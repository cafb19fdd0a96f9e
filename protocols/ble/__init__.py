"""``ble_contact_tracing``: Exposure Notification v1.2 beacons, exposure scoring and radios.

Modules: :mod:`~protocols.ble.gaen` (beacon crypto), :mod:`~protocols.ble.advert` (payload),
:mod:`~protocols.ble.sightings` (the shared sightings format), :mod:`~protocols.ble.scoring`
(sightings -> weights), :mod:`~protocols.ble.radio` (ideal and simulated radios),
:mod:`~protocols.ble.mapping` (simulator <-> physical), :mod:`~protocols.ble.scanner` (bleak),
:mod:`~protocols.ble.virtual_link` (bumble, tests). See ``protocols/ble/README.md``.
"""
