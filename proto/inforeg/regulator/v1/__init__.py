"""InfoReg regulator wire contract, version 1 (generated stubs beside regulator.proto)."""
