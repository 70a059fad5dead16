"""What a spooled record's check costs (aggregator/record_checks.py), per record of P float32 parameters.

* **on arrival**: deciding that an update's signed digest can stand for its record (a comparison of its tensor
  section's CBOR heads; the digest itself was computed anyway), the same for a masked input, and the CRC-32 the
  spool writer takes of a record no signed digest covers (an async buffer's stale update, scaled);
* **at resume**: rebuilding a float32, float16 or int8 update's tensor section from its record and hashing it,
  a masked input's likewise, and a CRC-32.

Medians of repeated runs on one core of this process.

    python bench/spool_record_checks.py                      # P = 1M (a 4 MB record), 2 tensors
    python bench/spool_record_checks.py --params 100000 --tensors 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # before bench/: bench/aggregator.py is no package

import numpy as np
from nacl.signing import SigningKey

from aggregator.models import Layout
from aggregator.record_checks import RecordCheck, TensorSection, crc32_check, masked_check, record_intact
from aggregator.verify import delta_of
from appliance import wire
from appliance.protocol import messages as m


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--tensors", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if min(args.params, args.tensors, args.repeats) < 1 or args.tensors > args.params:
        sys.exit("bench/spool_record_checks.py: --params, --tensors and --repeats must be positive, and --tensors at "
                 "most --params")

    sizes = [args.params // args.tensors] * args.tensors
    sizes[-1] += args.params - sum(sizes)
    specs = [wire.ParamSpec(f"layer{i}.weight", (n,)) for i, n in enumerate(sizes)]
    layout, section = Layout(specs), TensorSection(specs)
    rng = np.random.default_rng(0)
    tensors = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in specs}
    key = SigningKey.generate()
    rows: list[tuple[str, Callable[[], object]]] = []
    records = {}
    for encoding in ("float32", "float16", "int8"):
        body = wire.encode_update(wire.Update("d", 1, 0, b"\0" * 32, 1, tensors, encoding=encoding), key)
        verified = wire.verify(body, lambda kid: key.verify_key)
        _, delta, _ = delta_of(verified, layout, wire.DEFAULT_LIMITS)
        record, check = delta.view(np.uint8), section.check(verified, encoding)
        assert check is not None and record_intact(check, record, section)
        records[encoding] = (verified, record, check)
    words = rng.integers(0, 2**32, args.params + 1, dtype=np.uint32)
    masked = m.encode_masked(m.MaskedInput(1, "d", words, ()), key)
    masked_verified = wire.verify(masked, lambda kid: key.verify_key)
    envelope = masked[: len(masked) - m.masked_section_bytes(words.size)]

    def masked_on_arrival() -> RecordCheck | None:
        return masked_check(memoryview(masked), envelope, masked_verified.digest, masked_verified.payload,
                            words.nbytes)

    masked_signed = masked_on_arrival()
    assert masked_signed is not None
    record = records["float32"][1]
    crc = crc32_check(record)
    rows.append(("on arrival: float32 update, section heads compared", lambda: section.check(records["float32"][0],
                                                                                           "float32")))
    rows.append(("on arrival: int8 update, section heads compared, scales kept",
                 lambda: section.check(records["int8"][0], "int8")))
    rows.append(("on arrival: masked input, envelope and head compared", masked_on_arrival))
    rows.append(("on arrival: CRC-32 of the record (stale async update)", lambda: crc32_check(record)))
    for _, spooled, check in records.values():
        rows.append((f"at resume: {check.kind}", lambda s=spooled, c=check: record_intact(c, s, section)))
    rows.append(("at resume: masked-sha256", lambda: record_intact(masked_signed, words.view(np.uint8), None)))
    rows.append(("at resume: crc32", lambda: record_intact(crc, record, None)))
    print(f"record of {args.params:,} float32 parameters ({record.nbytes / 1e6:.2f} MB), {args.tensors} tensors; "
          f"median of {args.repeats}")
    for name, fn in rows:
        print(f"  {name:<66} {_median_ms(fn, args.repeats):8.3f} ms")


if __name__ == "__main__":
    main()
