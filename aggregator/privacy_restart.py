"""What a restart of ``fl-aggregator serve`` may change about a state's differential privacy (docs/privacy.md).

Every published model and the ledger (``<state>/privacy.json``) promise one guarantee: every round since the initial
model noised under one ``--dp`` mode and accounted at one delta. A restart that drops ``--dp``, or changes the mode
or the delta, would publish rounds outside that promise while the earlier releases and the ledger still state it, so
:func:`check_restart` refuses it before anything starts. The noise multiplier, the budget and adaptive clipping may
change: the ledger keeps each round's own noise multiplier and the accountant composes them, so the epsilon it
reports stays true.

The one way out is explicit: ``serve --dp-reset`` without ``--dp`` retires the ledger (renamed, never deleted) and
serves without differential privacy; it says in the log what guarantee is lost.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from nacl.signing import VerifyKey

from aggregator.privacy import LEDGER_FILE, PENDING_FILE, DPConfig, PrivacyError, RecordedDP, recorded_dp
from appliance import wire
from appliance.durable import fsync_dir

log = logging.getLogger(__name__)


def check_restart(state_dir: Path, config: DPConfig | None, reset: bool, key: VerifyKey) -> None:
    """Refuse (PrivacyError, one line) a start whose DP settings break the guarantee ``state_dir``'s ledger records;
    with ``reset`` (and no ``config``), retire the ledger instead. ``key``: the aggregator's, which signed the
    releases that name the mode of a ledger written before it recorded its own."""
    recorded = recorded_dp(state_dir)
    if recorded is not None and recorded.mode is None:
        recorded = dataclasses.replace(recorded, mode=released_mode(state_dir, key))
    given = "no --dp" if config is None else f"--dp {config.mode} --dp-delta {config.delta:g}"
    if reset:
        if config is not None:
            raise PrivacyError(
                f"--dp-reset goes without --dp: it stops differential privacy on this state; a new --dp mode or "
                f"delta needs a new --state (a guarantee covers every round from the initial model), given {given}")
        if recorded is not None:
            retire(state_dir, recorded)
        else:
            log.info("--dp-reset: %s holds no privacy ledger; nothing to retire", state_dir)
        return
    if recorded is None:
        return
    if config is None and recorded.rounds == 0:
        return  # nothing was noised (a first unmask that failed): no release promises anything yet
    if config is None:
        problem = "differential privacy would stop"
    elif recorded.mode is not None and recorded.mode != config.mode:
        problem = "the mode would change"
    elif recorded.delta != config.delta:
        problem = "the delta would change"
    else:
        return
    raise PrivacyError(
        f"{recorded.source} records {recorded.describe()}, given {given}: {problem}, and the models published so "
        "far promise that guarantee for every round; restart with the recorded --dp and --dp-delta, start a new "
        "--state, or stop DP with --dp-reset (docs/privacy.md)")


def released_mode(state_dir: Path, key: VerifyKey) -> str | None:
    """The --dp mode the newest signed release in ``<state>/models`` states (its ``dp`` map names "distributed";
    a central one names no mode), or None when it states no DP: how a ledger written before it recorded its mode
    is held to the mode its releases promised, instead of taking whatever mode the restart gives."""
    releases = sorted((Path(state_dir) / "models").glob("v*.release"))
    if not releases:
        return None
    data = releases[-1].read_bytes()
    try:
        payload = wire.verify(data, wire.pinned(key), wire.Limits(max_bytes=len(data))).payload
    except wire.ProtocolError as exc:
        raise PrivacyError(f"{releases[-1]}: {exc}: the newest release cannot say the --dp mode of the ledger "
                           "(written before ledgers recorded it)") from None
    dp = payload.get("dp")
    if not isinstance(dp, dict):
        return None
    return str(dp.get("mode", "central"))


def retire(state_dir: Path, recorded: RecordedDP) -> Path:
    """Rename the ledger to ``privacy-retired-<UTC time>.json`` (a record of what the earlier releases spent) and
    log what is lost. Refused while a counted round's model waits to be published: the restart with the recorded
    settings publishes it (and its acknowledged updates) first."""
    pending = Path(state_dir) / PENDING_FILE
    if pending.exists():
        raise PrivacyError(
            f"--dp-reset: {pending} holds a noised round counted but not yet published; restart once with "
            f"{recorded.flags()} to publish it, then --dp-reset")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = Path(state_dir) / f"privacy-retired-{stamp}.json"
    suffix = 1
    while target.exists():
        suffix += 1
        target = Path(state_dir) / f"privacy-retired-{stamp}-{suffix}.json"
    (Path(state_dir) / LEDGER_FILE).rename(target)
    fsync_dir(Path(state_dir))
    log.warning(
        "--dp-reset: the privacy ledger (%s) is retired to %s; models published from now on carry no differential "
        "privacy guarantee, and the epsilon the earlier releases state no longer bounds what the published models "
        "reveal (their later versions are trained on them without noise); --dp can never resume on this state",
        recorded.describe(), target.name)
    return target
