"""The ``regulator`` command: above both the server and the client library.

``serve`` runs the server (``regulator_service``); ``replay``, ``sessions``, ``show``, ``export``
and ``plot`` are clients (``regulator_client``). Neither package imports this one, so the
dependencies run one way: ``regulator_cli`` -> ``regulator_client`` -> ``regulator_service`` ->
``inforeg`` (the wire contract).
"""
