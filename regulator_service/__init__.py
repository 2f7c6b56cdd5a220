"""InfoReg regulation service: sessions, window detection, policies, persistence, metrics.

Rooms, each importing only the ones below it (``tests/test_layout.py``): ``edge/`` (gRPC, HTTP,
metrics, security, the server's assembly) over ``wire/`` (protobuf <-> domain) over ``core/``
(sessions and the manager) over ``capacity/`` (memory budget, history pages, read pacing) and
``storage/``; ``policy/``, ``model.py`` and ``errors.py`` are the vocabulary they share.
``serve.py`` is the command line, ``client_api.py`` all that the client library takes from here.
"""

__version__ = "0.1.0"
