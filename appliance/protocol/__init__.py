"""Secure aggregation (Bonawitz et al. 2017, with the SecAgg+ neighbour graph of Bell et al. 2020).

Pure protocol code, shared by the agent and the aggregator: no I/O, no clocks, no HTTP. Read in this order:

- :mod:`~appliance.protocol.prg`: ChaCha20 (RFC 8439) keystreams as uint32 words: how masks expand from seeds;
- :mod:`~appliance.protocol.shamir`: Feldman-verifiable Shamir sharing over the Ed25519 scalar field;
- :mod:`~appliance.protocol.dleq`: the proof a device's accusation of a dealer carries (discrete-log equality);
- :mod:`~appliance.protocol.graph`: who masks with whom (a random k-regular graph, or everyone);
- :mod:`~appliance.protocol.quantise`: a clipped, sample-weighted update as integers in Z_{2^32};
- :mod:`~appliance.protocol.secagg`: one round, as a device plays it and as the aggregator unmasks it.
"""
