"""Wire conversion: protobuf messages to domain values and back (``api.RegulatorAPI`` is the one
object the servicer and the in-process transport call), profiles' wire encoding included."""
